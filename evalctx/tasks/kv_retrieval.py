"""``kv_retrieval``: the value of one uuid key in a JSON object, as TensorRT-LLM's eval_long_context.py asks it.

Upstream (InfiniteBench Retrieve.KV, copied into TensorRT-LLM ``examples/infinitebench/``):
``construct_synthetic_dataset.build_kv_retrieval`` takes lost-in-the-middle's uuid4 key-value records and writes
``context = 'JSON data:\\n{"k": "v", "k": "v", ...}'`` and ``input = '\\nKey: "k"\\nThe value associated with the
specified key is: '``; ``eval_utils.create_prompt`` renders ``"Extract the value corresponding to the specified key
in the JSON object below.\\n\\n{context}\\n\\n{input}"``; 50 new tokens; scored by ``compute_scores``'s
``get_score_one_kv_retrieval`` (:func:`evalctx.tasks.scoring.kv_retrieval_match`). The last line of ``input`` is the
answer prefix here, so chat mode puts it in the assistant turn as passkey does.

Exact length. Upstream keeps a fixed number of pairs (928 at its 64K level, 2500 at 128K) whatever the tokenizer; here the
object holds as many whole pairs as make the prompt exactly ``context_length`` tokens, the JSON intact. Pairs are
counted in context (one tokenization of a batch of them); the object is filled with fresh pairs until less than one
pair is left, then filler pairs are swapped for fresh ones with more tokens (uuids tokenize to different counts)
until the count is exact (right above the minimum, an asked pair that alone does not fit is redrawn). Where that
cannot close the gap -- every pair the same count (a byte tokenizer), or less than one pair above the minimum --
JSON whitespace before the closing brace fills the last tokens (spaces, else newlines or tabs where space runs
merge; ``meta["pad_spaces"]`` counts its characters). The final text is tokenized once and its length asserted,
never truncated. Depth is the asked pair's place among the pairs: index
``round(depth * (n_pairs - 1))``.

``shape = "upstream"`` builds instead the prompt upstream builds, byte for byte: :func:`upstream_pairs` whole pairs
for the asked length, the asked pair at index ``min(int(depth x n), n - 1)`` (upstream's ``ans_id`` over the
shuffled records), no padding; the sample's ``context_length`` is the prompt's own token count. Followed:
NVIDIA/TensorRT-LLM ``examples/infinitebench/construct_synthetic_dataset.py`` (``build_kv_retrieval``, commit
a17b14f6), the copy ``eval_long_context.py`` pairs with, and ``eval_utils.py`` (commit f430a4b4). Its ``nnoise``
table has two levels, ``[928, 2500]`` for ``[64 * 1024, 128 * 1024]`` (it builds only the 128K one; the
``--test_level`` help says 0 or 1): those counts are taken exactly at 65,536 and 131,072 tokens. Between the levels
evalctx interpolates linearly (floored), below 64K it keeps the 64K level's rate (928 per 65,536 tokens) and above
128K the 128K level's (2500 per 131,072 tokens): those counts are evalctx's, no upstream builds them. OpenBMB/
InfiniteBench's own ``data/construct_synthetic_dataset.py`` (commits 89b78553, 220fd2e0) differs: ``nnoise = [928,
1855]`` (1855 at 128K), ``ans_id = (cnt // interv) * interv`` and the instruction inside ``input``; evalctx follows
TensorRT-LLM's. The uuids are evalctx's own seeded draws (upstream's come from lost-in-the-middle's unseeded
``uuid4``), so the text around them is upstream's, the uuids are not.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from itertools import accumulate
from typing import Any, ClassVar, Mapping

from evalctx.errors import LengthError
from evalctx.records import Sample
from evalctx.tasks.base import check_cell, take_shape
from evalctx.tasks.haystack_task import MIN_PROBES, HaystackTask
from evalctx.tasks.keys import draw
from evalctx.tasks.placement import SENTINEL, _token_containing, render_frame
from evalctx.models.tokenizer import Tokenizer

INSTRUCTION = "Extract the value corresponding to the specified key in the JSON object below."
CONTEXT_OPEN = "JSON data:\n{"
QUESTION = '\n\n\nKey: "{key}"'  # create_prompt's "\n\n" + input's leading "\n"
ANSWER_PREFIX = "\nThe value associated with the specified key is: "
SEP = ", "
_REF = '"00000000-0000-4000-8000-000000000000": "00000000-0000-4000-8000-000000000000"'  # context when counting
PAD_UNITS = (" ", "\n ", "\n", "\t")
"""JSON whitespace repeated before the closing brace to fill the last tokens, tried in this order."""
_SWAP_ROUNDS = 16  # batches of fresh pairs tried when closing the last gap by swaps
_SWAP_BATCH = 32
_MAX_VERIFY = 4
_MAX_ASKED = 100
_MIN_CACHE: dict[tuple[str, ...], int] = {}


UPSTREAM_NNOISE = {64 * 1024: 928, 128 * 1024: 2500}
"""TensorRT-LLM's construct_synthetic_dataset.py (a17b14f6) ``build_kv_retrieval``: ``nnoise = [928, 2500]`` for the
levels ``[64 * 1024, 128 * 1024]``."""


def pair_text(key: str, value: str) -> str:
    return f'"{key}": "{value}"'


def upstream_pairs(asked_length: int) -> int:
    """Key-value pairs in an upstream-shaped prompt of ``asked_length`` tokens: TensorRT-LLM's ``nnoise`` exactly at
    its levels (928 at 65,536, 2500 at 131,072 tokens); between them linear interpolation, below the first level
    its rate (928 per 65,536 tokens), above the last its rate (2500 per 131,072 tokens); rounded down, at least 1."""
    (lo, n_lo), (hi, n_hi) = sorted(UPSTREAM_NNOISE.items())
    if asked_length <= lo:
        n = asked_length * n_lo // lo
    elif asked_length >= hi:
        n = asked_length * n_hi // hi
    else:
        n = n_lo + (asked_length - lo) * (n_hi - n_lo) // (hi - lo)
    return max(1, n)


def upstream_prompt(pairs: list[tuple[str, str]], asked: int) -> str:
    """The raw prompt ``create_prompt(eg, "kv_retrieval", ...)`` renders for ``build_kv_retrieval``'s record of
    these pairs (in this order) asking ``pairs[asked]``'s key."""
    context = CONTEXT_OPEN + SEP.join(pair_text(k, v) for k, v in pairs) + "}"
    return f"{INSTRUCTION}\n\n{context}{QUESTION.format(key=pairs[asked][0])}{ANSWER_PREFIX}"


class KvRetrievalTask(HaystackTask):
    """``kv_retrieval``: find the value of the asked uuid key among whole JSON key-value pairs; no options."""

    name = "kv_retrieval"
    version = 1
    scorer = "kv_retrieval_match"
    default_max_new_tokens = 50  # TensorRT-LLM DATA_NAME_TO_MAX_NEW_TOKENS["kv_retrieval"]
    description = "InfiniteBench kv_retrieval (TensorRT-LLM wording): the value of one uuid key in a JSON object"
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, tokenizer: Tokenizer, options: Mapping[str, Any] | None = None,
                 prompt_mode: str = "raw") -> None:
        given = dict(options or {})
        self.shape = take_shape(self.name, given)
        super().__init__(tokenizer, given, prompt_mode)
        if self.shape == "upstream":
            self.options["shape"] = self.explicit["shape"] = "upstream"

    def _haystack(self) -> None:  # type: ignore[override]  # the pairs are drawn per sample
        return None

    def id_options(self) -> dict[str, Any]:
        return dict(self.options)

    def make_sample(self, context_length: int, depth: float, seed: int, max_new_tokens: int | None = None) -> Sample:
        depth = check_cell(context_length, depth)
        mnt = self.default_budget() if max_new_tokens is None else max_new_tokens
        rng = self._rng(context_length, depth, seed)
        if self.shape == "upstream":
            return self._upstream_sample(context_length, depth, seed, mnt, rng)
        # Right above the minimum, an asked pair that tokenizes too long, or that leaves a gap no JSON whitespace
        # can fill (a SentencePiece space costs 2 tokens, so a 1-token gap has no padding), is redrawn.
        error: LengthError | None = None
        for _ in range(_MAX_ASKED):
            b = _Builder(self, rng)
            try:
                text, ids, offsets, pairs, j, pad = b.build(context_length, depth)
                break
            except LengthError as exc:
                error = exc
        else:
            assert error is not None
            raise error
        body_start = len(b.frame.pre)
        asked_start = body_start + sum(len(p) + len(SEP) for p in pairs[:j])
        asked_end = asked_start + len(pairs[j])
        body_end = len(text) - len(b.frame.post)
        t_body, t_asked = _token_containing(offsets, body_start), _token_containing(offsets, asked_start)
        t_after, t_end = _token_containing(offsets, asked_end), _token_containing(offsets, body_end)
        filler_tokens = (t_end - t_body) - (t_after - t_asked)
        depth_actual = None if filler_tokens <= 0 else min(max((t_asked - t_body) / filler_tokens, 0.0), 1.0)
        messages = None
        if self.prompt_mode == "chat":
            messages = [{"role": "user", "content": b.user.replace(SENTINEL, text[body_start:body_end])},
                        {"role": "assistant", "content": ANSWER_PREFIX.lstrip()}]
        return Sample(id=self.sample_id(context_length, depth, seed, mnt), task=self.name,
                      context_length=context_length, depth=depth, seed=seed, prompt=text, prompt_ids=ids,
                      target=[b.value], needle_token_index=t_asked, max_new_tokens=mnt,
                      add_special_tokens=b.frame.add_special_tokens, prompt_mode=self.prompt_mode,
                      depth_actual=depth_actual, scorer=self.scorer,
                      meta={"key": b.key, "n_pairs": len(pairs), "pad_spaces": len(pad),
                            "answer_tokens": self._value_tokens(b.value)}, messages=messages,
                      special_spans=b.spans(text))

    def _upstream_sample(self, asked_length: int, depth: float, seed: int, mnt: int, rng: random.Random) -> Sample:
        """:func:`upstream_pairs` whole pairs, the asked one at upstream's index, rendered as ``create_prompt`` renders
        them (raw mode: :func:`upstream_prompt` exactly); ``context_length`` is the prompt's own token count."""
        b = _Builder(self, rng)
        n = upstream_pairs(asked_length)
        j = min(int(depth * n + 1e-9), n - 1)  # upstream floors cnt * nnoise / nsample; 1e-9 undoes float error
        fillers = [pair_text(b._uuid(), b._uuid()) for _ in range(n - 1)]
        pairs = fillers[:j] + [b.asked] + fillers[j:]
        text = b.frame.pre + SEP.join(pairs) + b.frame.post
        ids, offsets = b.encode(text)
        body_start = len(b.frame.pre)
        asked_start = body_start + sum(len(p) + len(SEP) for p in pairs[:j])
        t_body, t_asked = _token_containing(offsets, body_start), _token_containing(offsets, asked_start)
        t_after = _token_containing(offsets, asked_start + len(b.asked))
        t_end = _token_containing(offsets, len(text) - len(b.frame.post))
        filler_tokens = (t_end - t_body) - (t_after - t_asked)
        depth_actual = None if filler_tokens <= 0 else min(max((t_asked - t_body) / filler_tokens, 0.0), 1.0)
        messages = None
        if self.prompt_mode == "chat":
            messages = [{"role": "user", "content": b.user.replace(SENTINEL, SEP.join(pairs))},
                        {"role": "assistant", "content": ANSWER_PREFIX.lstrip()}]
        return Sample(id=self.sample_id(asked_length, depth, seed, mnt), task=self.name, context_length=asked_length,
                      depth=depth, seed=seed, prompt=text, prompt_ids=ids, target=[b.value],
                      needle_token_index=t_asked, max_new_tokens=mnt, add_special_tokens=b.frame.add_special_tokens,
                      prompt_mode=self.prompt_mode, depth_actual=depth_actual, scorer=self.scorer,
                      meta={"key": b.key, "n_pairs": n, "asked_pair": j, "shape": "upstream",
                            "asked_length": asked_length, "prompt_tokens": len(ids),
                            "answer_tokens": self._value_tokens(b.value)},
                      messages=messages, special_spans=b.spans(text))

    def min_length(self) -> int:
        """Upstream-shaped prompts are never cut to a length: every asked length builds (one pair at least)."""
        return 1 if self.shape == "upstream" else self._exact_min_length()

    def answer_tokens(self) -> int:
        """The longest answer (a uuid value after the answer prefix) of the probed draws, in tokens."""
        key = ("answer", self.tokenizer.fingerprint(), self.prompt_mode)
        if key not in _MIN_CACHE:
            values = (_Builder(self, self._rng(0, 0.5, seed)).value for seed in range(MIN_PROBES))
            _MIN_CACHE[key] = max(self._value_tokens(v) for v in values)
        return _MIN_CACHE[key]

    def _value_tokens(self, value: str) -> int:
        """Tokens of one answer (a space and the uuid value): ``meta["answer_tokens"]`` of its sample."""
        return len(self.tokenizer.encode(" " + value))

    def _exact_min_length(self) -> int:
        """The longest minimum of :data:`~evalctx.tasks.haystack_task.MIN_PROBES` seeded draws of the asked pair
        (uuids differ in tokens), as every task states its minimum; a sample's draw that does not fit is redrawn."""
        key = ("minimum", self.tokenizer.fingerprint(), self.prompt_mode)
        if key not in _MIN_CACHE:
            _MIN_CACHE[key] = max(_Builder(self, self._rng(0, 0.5, seed)).minimum() for seed in range(MIN_PROBES))
        return _MIN_CACHE[key]


class _Builder:
    """One sample's draw: the asked pair, a stream of fresh filler pairs, and the search for the exact count."""

    def __init__(self, task: KvRetrievalTask, rng: random.Random) -> None:
        self.tok, self.rng = task.tokenizer, rng
        self.seen: set[str] = set()
        self.key, self.value = self._uuid(), self._uuid()
        self.asked = pair_text(self.key, self.value)
        self.user = f"{INSTRUCTION}\n\n{CONTEXT_OPEN}{SENTINEL}}}{QUESTION.format(key=self.key)}"
        self.frame = render_frame(self.tok, task.prompt_mode, self.user, ANSWER_PREFIX)
        self._minimum: int | None = None

    def _uuid(self) -> str:
        while True:  # all keys and values distinct, so the asked value occurs once
            u = draw("uuids", self.rng)
            if u not in self.seen:
                self.seen.add(u)
                return u

    def count(self, text: str) -> int:
        return len(self.tok.encode(text, add_special_tokens=False))

    def spans(self, text: str) -> list[tuple[int, int]]:
        """The chat template's spans in ``text`` (``frame.pre + body + frame.post``): only there are special-token
        strings special (``Sample.special_spans``); empty in raw mode."""
        shift = len(text) - len(self.frame.post)
        return self.frame.spans("pre") + [(shift + a, shift + b) for a, b in self.frame.spans("post")]

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and offsets of a whole prompt, as :class:`~evalctx.records.Sample` states them."""
        return self.tok.encode_with_offsets(text, self.frame.add_special_tokens, self.spans(text))

    def minimum(self) -> int:
        """Tokens of the prompt whose object holds the asked pair alone."""
        if self._minimum is None:
            self._minimum = len(self.encode(self.frame.pre + self.asked + self.frame.post)[0])
        return self._minimum

    def pair_counts(self, pairs: list[str]) -> list[int]:
        """Tokens each pair adds inside the object, all measured in one tokenization between two fixed pairs.

        A pair owns the tokens that start between its opening quote and the next pair's, so the ``, "`` seam
        counts once whichever way the tokenizer merges it; the counts add up to the body's tokens."""
        text = _REF + SEP + SEP.join(pairs) + SEP + _REF
        starts = [len(_REF) + len(SEP) + s for s in accumulate((len(p) + len(SEP) for p in pairs[:-1]), initial=0)]
        end = starts[-1] + len(pairs[-1]) + len(SEP)
        counts = [0] * len(pairs)
        for a, _ in self.tok.encode_with_offsets(text, add_special_tokens=False)[1]:
            if starts[0] <= a < end:
                counts[bisect_right(starts, a) - 1] += 1
        return counts

    def fresh(self, n: int) -> tuple[list[str], list[int]]:
        pairs = [pair_text(self._uuid(), self._uuid()) for _ in range(n)]
        return pairs, self.pair_counts(pairs)

    def fill(self, need: int, per_pair: int) -> tuple[list[str], list[int]]:
        """Fresh pairs whose counts add up to at most ``need``, less than one pair short of it."""
        pairs: list[str] = []
        counts: list[int] = []
        total = 0
        while total < need:
            more, c = self.fresh(max((need - total) // max(per_pair, 1), 0) + 8)
            pairs += more
            counts += c
            total += sum(c)
        while pairs and total > need:
            total -= counts.pop()
            pairs.pop()
        return pairs, counts

    def swap(self, pairs: list[str], counts: list[int], gap: int) -> int:
        """Close ``gap`` (>= 0) by swapping filler pairs for fresh ones with more tokens; returns what is left."""
        if not pairs:
            return gap
        by_count: dict[int, list[int]] = {}
        for i, c in enumerate(counts):
            by_count.setdefault(c, []).append(i)
        for _ in range(_SWAP_ROUNDS):
            if gap == 0:
                break
            cands, cc = self.fresh(_SWAP_BATCH)
            if max(cc) <= min(by_count):
                break  # no fresh pair has more tokens than any filler: swaps cannot add any
            for cand, c in zip(cands, cc):
                # The filler that gains the most without overshooting: the fewest tokens >= c - gap, below c.
                options = [k for k in by_count if c - gap <= k < c and by_count[k]]
                if not options:
                    continue
                k = min(options)
                i = by_count[k].pop()
                pairs[i], counts[i] = cand, c
                by_count.setdefault(c, []).append(i)
                gap -= c - k
                if gap == 0:
                    break
        return gap

    def pad_for(self, gap: int) -> str | None:
        """JSON whitespace before the closing brace that adds exactly ``gap`` tokens (measured locally), or None.

        Spaces first; where runs of spaces merge into few tokens (SmolLM2/StarCoder vocabularies hold whitespace
        runs: 2 tokens for any run of 2-21 spaces, so lengths from the minimum up to one pair more had no
        padding at all), the other units of :data:`PAD_UNITS`."""
        if gap == 0:
            return ""
        right = self.frame.post[:16]
        base = self.count(_REF + right)
        for unit in PAD_UNITS:
            for p in range(1, 8 * gap + 64):
                got = self.count(_REF + unit * p + right) - base
                if got == gap:
                    return unit * p
                if got > gap + 8:
                    break
        return None

    def build(self, length: int, depth: float) -> tuple[str, list[int], list[tuple[int, int]], list[str], int, str]:
        """(text, ids, offsets, pairs, asked index, padding) of a prompt of exactly ``length`` tokens."""
        t1 = self.minimum()
        where = f"kv_retrieval at {length} tokens with tokenizer {self.tok.name}"
        if length < t1:
            raise LengthError(f"{where}: too short; the template and one key-value pair need {t1} tokens")
        c_asked = self.pair_counts([self.asked])[0]
        need = length - t1  # tokens the filler pairs and the padding must add
        for _ in range(_MAX_VERIFY):
            pairs, counts = self.fill(max(need, 0), c_asked)
            pad = None
            for _drop in range(3):  # a few pairs fewer when the padding cannot make the rest
                gap = self.swap(pairs, counts, max(need, 0) - sum(counts))
                pad = self.pad_for(gap)
                if pad is not None or not pairs:
                    break
                pairs.pop()
                counts.pop()
            if pad is None:
                break
            j = round(depth * len(pairs))  # of len(pairs) + 1 pairs in all
            pairs = pairs[:j] + [self.asked] + pairs[j:]
            text = self.frame.pre + SEP.join(pairs) + pad + self.frame.post
            ids, offsets = self.encode(text)
            if len(ids) == length:
                return text, ids, offsets, pairs, j, pad
            need -= len(ids) - length  # a seam the local counts missed: aim that much off
        raise LengthError(f"{where}: no choice of whole key-value pairs and JSON whitespace tokenizes to exactly "
                          f"{length} tokens; try a length a few tokens away")
