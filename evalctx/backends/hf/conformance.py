"""Conformance of the hf engine with the model itself: the same answers as the model's own ``generate`` on the
whole prompt, for every combination of the engine's settings.

The reference is transformers' ``model.generate(prompt_ids, do_sample=False)`` on one prompt at a time, loaded
with the attention transformers picks itself, in the same dtype on the same device, starting from the state the
model has when loaded (dynamic NTK RoPE keeps frequencies between calls: its rotary modules are returned to their
load-time state before each prompt, as a fresh load would). Its answer is cut after the first end id (generation
config's or tokenizer's, as the engine stops, :mod:`.greedy`).

The engine runs the same prompts through :class:`~evalctx.backends.hf.backend.HFBackend` for each combination of
``chunk_size``, ``prefix_reuse`` and batch size, in one process per combination, prompts of a length one after the
other (so prefix reuse and the rotary state carry over as in a run). Per cell it reports how many answers are the
same token for token and the largest relative error of the first-token logits against the model's forward.

An answer that differs passes only as a near-tie: at the first token where it leaves the reference, the
reference's logit of the engine's token is within ``tie_tolerance`` x the largest logit of the reference's own
token (0 in float32, where the engine must be exact; 2e-2 in bf16/fp16, a few roundings of bf16's 8-bit mantissa,
since chunked attention and one whole forward round differently).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

DEPTHS = (1.0, 0.75, 0.5)
SEEDS = (0, 1)
"""Prompts per length: these needle depths for each seed (another passkey, the same haystack), seed by seed. Batch
3 makes two batches whose rows share at least half the prompt, so prefix reuse works in batches too."""


@dataclass(frozen=True)
class Case:
    chunk_size: int
    prefix_reuse: bool
    batch: int

    def label(self) -> str:
        return f"chunk {self.chunk_size or 'whole'}, reuse {'on' if self.prefix_reuse else 'off'}, batch {self.batch}"


@dataclass
class Cell:
    """One combination at one length."""

    case: Case
    length: int
    n: int = 0
    same: int = 0
    """Answers identical token for token to the reference's."""
    ties: int = 0
    """Answers that leave the reference only at a near-tie of its logits (counted as passing)."""
    logit_error: float = 0.0
    """Largest relative L2 error of the first-token logits against the model's forward on the whole prompt."""
    logit_tolerance: float = 0.0
    cached: int = 0
    """Prompt tokens the engine took from its KV cache (prefix reuse) instead of computing."""
    error: str | None = None
    differing: list[str] = field(default_factory=list)
    """For each answer that fails: the depth, the reference's and the engine's token ids."""

    @property
    def ok(self) -> bool:
        return self.error is None and self.same + self.ties == self.n and self.logit_error <= self.logit_tolerance


def tie_tolerance(dtype: Any) -> float:
    import torch

    return 0.0 if dtype == torch.float32 else 2e-2


def default_cases(chunks: Iterable[int], batches: Iterable[int], reuse: Iterable[bool]) -> list[Case]:
    """Every combination; prefix reuse only with chunked prefill (it reuses whole chunks)."""
    return [Case(c, r, b) for c in chunks for r in reuse for b in batches if not (r and c == 0)]


def sample_prompts(tokenizer: Any, length: int) -> list[tuple[str, list[int]]]:
    """Passkey prompts of exactly ``length`` tokens, named by depth and seed (:data:`DEPTHS`, :data:`SEEDS`)."""
    from evalctx.tasks import get_task

    task = get_task("passkey")(tokenizer, {})
    return [(f"depth {d:g} seed {s}", task.make_sample(length, d, s).prompt_ids) for s in SEEDS for d in DEPTHS]


class Reference:
    """The model's own greedy ``generate`` on whole prompts (see the module docstring)."""

    def __init__(self, model_dir: str, dtype: Any, device: Any, ends: set[int]) -> None:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        from evalctx.backends.hf import rope

        # generate's notices (prompts past max_position_embeddings, unused sampling fields) are expected here.
        transformers.utils.logging.set_verbosity_error()

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, local_files_only=True).to(device)
        self.model.eval()
        self.device = device
        self.ends = ends
        self._rotary = [m for m in self.model.modules() if rope._is_rotary(m)]
        self._initial = [rope._snapshot(m) for m in self._rotary]

    def _fresh(self) -> None:
        from evalctx.backends.hf import rope

        for module, state in zip(self._rotary, self._initial):
            rope._restore(module, state)

    def answer(self, ids: list[int], max_new: int) -> tuple[list[int], list[Any]]:
        """The greedy answer cut after its first end id, and the logits of every step (float32, vocab)."""
        import warnings

        torch = self.torch
        self._fresh()
        x = torch.tensor([ids], device=self.device)
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sampling fields of generation_config.json unused with do_sample=False
            out = self.model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                      max_new_tokens=max_new, output_logits=True, return_dict_in_generate=True,
                                      pad_token_id=self.model.generation_config.pad_token_id or 0)
        tokens = out.sequences[0, len(ids):].tolist()
        cut = next((i + 1 for i, t in enumerate(tokens) if t in self.ends), len(tokens))
        return tokens[:cut], [step[0].float() for step in out.logits[:cut]]

    def first_logits(self, ids: list[int]) -> Any:
        """The model's forward over the whole prompt: its last position's logits, float32."""
        torch = self.torch
        self._fresh()
        with torch.inference_mode():
            x = torch.tensor([ids], device=self.device)
            return self.model(input_ids=x, logits_to_keep=1).logits[0, -1].float()


def compare(make_reference: Any, make_backend: Any, cases: Sequence[Case], lengths: Sequence[int], max_new: int,
            prompts: dict[int, list[tuple[str, list[int]]]], leader: bool = True) -> list[Cell]:
    """Run every case at every length through a backend from ``make_backend(case)`` and compare with the
    :class:`Reference` that ``make_reference(first_backend)`` returns (built once, after the first backend, whose
    device and dtype it takes). Returns one cell per (case, length). Ranks that are not ``leader`` (tp followers)
    only run the engine, whose collectives need them, and return no cells."""
    from evalctx.backends.hf.support import tolerance

    reference: Reference | None = None
    expected: dict[tuple[int, str], Any] = {}
    first: dict[tuple[int, str], Any] = {}
    cells = []
    order = sorted(lengths, reverse=True)  # longest first, as the runner orders a replica's samples
    for case in cases:
        engine = make_backend(case)
        if leader and reference is None:
            reference = make_reference(engine)
            expected = {(n, d): reference.answer(ids, max_new) for n in lengths for d, ids in prompts[n]}
            first = {(n, d): reference.first_logits(ids) for n in lengths for d, ids in prompts[n]}
        for n in order:
            cell = Cell(case, n, logit_tolerance=tolerance(engine.dtype))
            try:
                _run_cell(engine, cell, prompts[n], expected, first, max_new, tie_tolerance(engine.dtype), n,
                          leader)
            except Exception as exc:  # one failing combination is a row of the matrix, not the end of it
                if not leader:
                    raise
                cell.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            if leader:
                cells.append(cell)
        engine.close()
    return cells


def _run_cell(engine: Any, cell: Cell, prompts: list[tuple[str, list[int]]], expected: dict, first: dict,
              max_new: int, tie: float, n: int, leader: bool) -> None:
    from evalctx.records import GenerationRequest

    b = cell.case.batch
    for i in range(0, len(prompts), b):
        group = prompts[i:i + b]
        reqs = [GenerationRequest(sample_id=f"{n} {d}", prompt_ids=ids, prompt="", max_new_tokens=max_new)
                for d, ids in group]
        results = engine.generate(reqs)
        if not leader:
            continue
        logits = engine.last_prefill_logits
        for row, ((depth, _), res) in enumerate(zip(group, results)):
            if res.error:
                raise RuntimeError(res.error)
            ref_tokens, ref_logits = expected[(n, depth)]
            got = _engine_tokens(res, ref_tokens, engine.eos_ids)
            ref_first = first[(n, depth)]
            err = float((logits[row].float() - ref_first).norm() / ref_first.norm().clamp_min(1e-30))
            cell.logit_error = max(cell.logit_error, err)
            cell.n += 1
            cell.cached += res.n_cached_prompt_tokens or 0
            verdict = _verdict(ref_tokens, ref_logits, got, tie)
            if verdict == "same":
                cell.same += 1
            elif verdict == "tie":
                cell.ties += 1
            else:
                cell.differing.append(f"{depth}: reference {ref_tokens}, engine {got}")


def _engine_tokens(res: Any, ref: list[int], ends: set[int]) -> list[int]:
    """The engine's answer as the reference is cut: its output ids, then the end token it stopped on (which it
    leaves out): the reference's own token there when that is an end id, else a marker no vocabulary has."""
    got = list(res.output_ids or [])
    if res.finish_reason == "stop":
        k = len(got)
        got.append(ref[k] if k < len(ref) and ref[k] in ends else -1)
    return got


def _verdict(ref: list[int], ref_logits: list[Any], got: list[int], tie: float) -> str:
    if got == ref:
        return "same"
    i = next((k for k, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
    if i >= len(ref) or i >= len(got) or got[i] < 0 or tie <= 0:
        return "differs"
    step = ref_logits[i]
    gap = float(step[ref[i]] - step[got[i]])
    return "tie" if gap <= tie * float(step.abs().max()) else "differs"


def markdown(rows: Sequence[tuple[str, Cell]]) -> str:
    """The matrix as a Markdown table, one row per (model, case, length)."""
    lines = ["| model | chunk_size | prefix_reuse | batch | length | same answers | near-ties | first-token "
             "logit error (tolerance) | cached prompt tokens | result |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, c in rows:
        result = "ok" if c.ok else ("error: " + c.error if c.error else "DIFFERS")
        lines.append(f"| {name} | {c.case.chunk_size or 'whole'} | {'on' if c.case.prefix_reuse else 'off'} | "
                     f"{c.case.batch} | {c.length} | {c.same}/{c.n} | {c.ties} | {c.logit_error:.1g} "
                     f"({c.logit_tolerance:g}) | {c.cached} | {result} |")
    return "\n".join(lines)
