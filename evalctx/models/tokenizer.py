"""Tokenizer adapters: any Hugging Face tokenizer directory (offline), and a byte tokenizer for tests.

Generators need three things from a tokenizer: ids with character offsets (to splice in token space and map
sentence boundaries), which special tokens it puts before a text (BOS counts toward the exact length), and its chat
template.

Two rules keep prompts what the model expects, whatever the tokenizer's files say:

* ``add_special_tokens=True`` adds only the special tokens a tokenizer puts *before* the text (BOS, BERT's [CLS]).
  Ones it appends (``add_eos_token``, a post-processor ``$A </s>``, BERT's [SEP]) never: nothing may follow the
  answer prefix, or the model reads an end of text where its answer should start.
* ``special_spans`` says where special-token strings are special: inside those character spans (the chat
  template's own markers) they become their ids; everywhere else they are text (an essay that contains ``<s>`` or
  ``<|im_start|>`` is tokenized as those characters). ``None`` keeps the tokenizer's own behaviour (parsed
  anywhere), which is what servers do with text prompts.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

from evalctx.errors import UsageError, require_extra

Offsets = list[tuple[int, int]]
Spans = Sequence[tuple[int, int]]


@runtime_checkable
class Tokenizer(Protocol):
    name: str
    eos_token_id: int | None
    chat_date: _dt.date | None
    """The day the chat template sees as today (None: the real day); see HFTokenizer.apply_chat_template."""

    def encode(self, text: str, add_special_tokens: bool = False, special_spans: Spans | None = None) -> list[int]:
        """Ids of ``text``; ``add_special_tokens`` adds the leading specials only (see the module docstring)."""
        ...

    def encode_with_offsets(self, text: str, add_special_tokens: bool = False,
                            special_spans: Spans | None = None) -> tuple[list[int], Offsets]:
        """Ids and (start, end) character offsets into ``text``; added leading specials get (0, 0)."""
        ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def fingerprint(self) -> str:
        """Short stable hash: two tokenizers with the same fingerprint tokenize identically."""
        ...

    def has_chat_template(self) -> bool: ...

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        """Render ``messages`` with the generation prompt added, as text (special tokens included as text)."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as tokens (id = byte + 3); BOS=1 added with special tokens. Deterministic and dependency-free.

    ``chat=True`` gives it a minimal chat template so chat-mode code paths can be tested without a model hub.
    """

    PAD, BOS, EOS = 0, 1, 2
    OFFSET = 3
    vocab_size = 256 + OFFSET

    def __init__(self, chat: bool = False) -> None:
        self.chat = chat
        self.name = "byte-chat" if chat else "byte"
        self.eos_token_id = self.EOS
        self.chat_date: _dt.date | None = None  # its template writes no date

    def encode(self, text: str, add_special_tokens: bool = False, special_spans: Spans | None = None) -> list[int]:
        ids = [b + self.OFFSET for b in text.encode("utf-8")]  # no special token has a text form here
        return [self.BOS, *ids] if add_special_tokens else ids

    def encode_with_offsets(self, text: str, add_special_tokens: bool = False,
                            special_spans: Spans | None = None) -> tuple[list[int], Offsets]:
        ids: list[int] = [self.BOS] if add_special_tokens else []
        offsets: Offsets = [(0, 0)] if add_special_tokens else []
        if text.isascii():
            ids.extend(b + self.OFFSET for b in text.encode("ascii"))
            offsets.extend((i, i + 1) for i in range(len(text)))
            return ids, offsets
        for i, ch in enumerate(text):
            for b in ch.encode("utf-8"):
                ids.append(b + self.OFFSET)
                offsets.append((i, i + 1))
        return ids, offsets

    def decode(self, ids: Sequence[int]) -> str:
        # Ids past the byte range (a model with a larger vocabulary) decode to nothing, as unknown ids do in HF.
        data = bytes(i - self.OFFSET for i in ids if self.OFFSET <= i < self.vocab_size)
        return data.decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        return self.name

    def has_chat_template(self) -> bool:
        return self.chat

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        if not self.chat:
            raise UsageError("tokenizer 'byte' has no chat template: use --prompt-mode raw or tokenizer 'byte-chat'")
        parts = [f"<|{m['role']}|>\n{m['content']}\n" for m in messages]
        return "".join(parts) + "<|assistant|>\n"


_MARK = "\ue000evalctx-segment\ue000"
"""A non-special added token (private-use characters) that stands for "a special token came just before"."""


class HFTokenizer:
    """A Hugging Face tokenizer loaded offline from a directory; uses the Rust tokenizer for speed and offsets."""

    def __init__(self, path: str | os.PathLike[str], gguf_file: str | None = None) -> None:
        require_extra("transformers", "hf")
        from transformers import AutoTokenizer

        self.path = Path(path)
        if not self.path.is_dir():
            raise UsageError(f"tokenizer directory not found: {self.path} (pass --tokenizer DIR with tokenizer files)")
        from evalctx.models.fingerprint import TOKENIZER_FILES

        if not gguf_file and not any((self.path / n).is_file() for n in TOKENIZER_FILES):
            raise UsageError(f"{self.path} holds no tokenizer files (tokenizer.json, tokenizer_config.json, "
                             "tokenizer.model, ...): pass --tokenizer DIR with the model's tokenizer")
        kwargs = {"local_files_only": True}
        if gguf_file:
            kwargs["gguf_file"] = gguf_file
        try:
            self.hf = AutoTokenizer.from_pretrained(str(self.path), **kwargs)
        except Exception as exc:  # transformers raises many types, over several lines; the user needs one line
            why = " ".join(f"{type(exc).__name__}: {exc}".split())
            raise UsageError(f"cannot load a tokenizer from {self.path}: {why}") from exc
        if not getattr(self.hf, "is_fast", False):
            raise UsageError(
                f"tokenizer in {self.path} has no fast (Rust) version; evalctx needs token offsets: "
                "save it with a tokenizer.json (PreTrainedTokenizerFast)"
            )
        # A tokenizer.json may carry truncation/padding settings: they would cut prompts silently. Never.
        self._rust = self.hf.backend_tokenizer
        self._rust.no_truncation()
        self._rust.no_padding()
        self.name = str(self.path)
        self.eos_token_id = self.hf.eos_token_id
        self.chat_date: _dt.date | None = None
        """The day chat templates see as today (None: the real one); pinned by the run that builds prompts."""
        self._gguf_file = gguf_file
        self._special_ids = {i for i, t in self.hf.added_tokens_decoder.items() if t.special}
        self.leading_special_ids = self._leading_specials()
        self._plain: Any = None  # a copy that reads special-token strings as text, built on first need

    @property
    def text_vocab_size(self) -> int:
        """Ids plain text can become: the vocabulary without added tokens."""
        return int(self._rust.get_vocab_size(with_added_tokens=False))

    def _leading_specials(self) -> list[int]:
        """The ids the post-processor puts before a text (BOS); what it appends (EOS, [SEP]) is dropped."""
        probe = "Hello there. 12345"
        with_specials = self._rust.encode(probe, add_special_tokens=True).ids
        bare = self._rust.encode(probe, add_special_tokens=False).ids
        for i in range(len(with_specials) - len(bare) + 1):
            if with_specials[i:i + len(bare)] == bare:
                return with_specials[:i]
        raise UsageError(f"tokenizer {self.path}: its post-processor changes the ids of the text itself, so evalctx "
                         "cannot tell which special tokens it adds; use a tokenizer.json whose post-processor only "
                         "adds tokens around the text")

    def encode(self, text: str, add_special_tokens: bool = False, special_spans: Spans | None = None) -> list[int]:
        return self.encode_with_offsets(text, add_special_tokens, special_spans)[0]

    def encode_with_offsets(self, text: str, add_special_tokens: bool = False,
                            special_spans: Spans | None = None) -> tuple[list[int], Offsets]:
        enc = self._rust.encode(text, add_special_tokens=False)
        ids, offsets = enc.ids, enc.offsets
        if special_spans is not None and not self._special_ids.isdisjoint(ids):
            parsed, kept = self._parsed_specials(text, ids, offsets, special_spans)
            if len(kept) < len(parsed):
                ids, offsets = self._retokenize_between(text, ids, offsets, kept)
        if add_special_tokens and self.leading_special_ids:
            lead = self.leading_special_ids
            ids, offsets = [*lead, *ids], [(0, 0)] * len(lead) + list(offsets)
        return ids, offsets

    def _parsed_specials(self, text: str, ids: list[int], offsets: Offsets,
                         spans: Spans) -> tuple[list[int], list[int]]:
        """Indices of the special tokens parsed from their literal text, and of those among them that start inside
        ``spans`` (lstrip whitespace not counted). An ``<unk>`` made of unknown characters is no parsed special."""
        parsed: list[int] = []
        kept: list[int] = []
        for k, t in enumerate(ids):
            if t in self._special_ids:
                a, b = offsets[k]
                core = text.find(self._rust.id_to_token(t), a, b)
                if core < 0:
                    continue
                parsed.append(k)
                if any(s <= core < e for s, e in spans):
                    kept.append(k)
        return parsed, kept

    def _retokenize_between(self, text: str, ids: list[int], offsets: Offsets,
                            kept: list[int]) -> tuple[list[int], Offsets]:
        """Keep the special tokens at ``kept``; tokenize every stretch between them as text.

        The kept tokens split the text exactly as the tokenizer splits it around any added token (with their
        lstrip/rstrip whitespace, which their offsets cover). Each stretch after one is encoded behind a marker
        added token, so it sees the same "after an added token" context (e.g. no Metaspace prefix space with
        ``prepend_scheme="first"``) as in one pass.
        """
        plain = self._plain_tokenizer()
        out_ids: list[int] = []
        out_offsets: Offsets = []
        cur = 0
        for k in [*kept, None]:
            a, b = (offsets[k] if k is not None else (len(text), len(text)))
            if a > cur:
                shift = 0 if cur == 0 else len(_MARK)
                piece = text[cur:a] if cur == 0 else _MARK + text[cur:a]
                enc = plain.encode(piece, add_special_tokens=False)
                skip = 1 if shift else 0  # the marker's own id
                out_ids += enc.ids[skip:]
                out_offsets += [(s + cur - shift, e + cur - shift) for s, e in enc.offsets[skip:]]
            if k is not None:
                out_ids.append(ids[k])
                out_offsets.append((a, b))
                cur = b
        return out_ids, out_offsets

    def _plain_tokenizer(self) -> Any:
        if self._plain is None:
            from tokenizers import AddedToken
            from tokenizers import Tokenizer as RustTokenizer

            data = json.loads(self._rust.to_str())
            model = data.get("model") or {}
            if model.get("type") == "Unigram":
                # A Unigram vocabulary holds the special tokens as pieces ("<s>"), which its Viterbi search
                # would pick from plain text; SentencePiece never matches control symbols. Rename them (their
                # ids and scores stay, so everything else tokenizes exactly as before).
                names = {self._rust.id_to_token(i) for i in self._special_ids} - {self.hf.unk_token}
                model["vocab"] = [[f"\ue000{p}\ue000" if p in names else p, score] for p, score in model["vocab"]]
            plain = RustTokenizer.from_str(json.dumps(data))
            plain.add_tokens([AddedToken(_MARK, special=False, normalized=False)])
            plain.encode_special_tokens = True  # special-token strings are text
            self._plain = plain
        return self._plain

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True)

    def fingerprint(self) -> str:
        from evalctx.models.fingerprint import TOKENIZER_FILES

        h = hashlib.sha1()
        for name in TOKENIZER_FILES:  # chat templates too: they decide chat-mode prompts
            p = self.path / name
            if p.is_file():
                h.update(name.encode())
                h.update(p.read_bytes())
        if self._gguf_file:
            h.update(self._gguf_file.encode())
            h.update(str((self.path / self._gguf_file).stat().st_size).encode())
        return h.hexdigest()[:16]

    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        """The template over ``messages`` with the generation prompt. With :attr:`chat_date` set, templates that
        write today's date (Llama 3.x's ``strftime_now``) write that date instead, so a prompt does not change with
        the day it is built on (:mod:`evalctx.models.chat_identity`)."""
        if not self.has_chat_template():
            raise UsageError(f"tokenizer {self.path} has no chat template: use prompt_mode = \"raw\"")
        extra = self._pin_date()
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)

    def _pin_date(self) -> dict[str, Any]:
        """Make the template's ``strftime_now`` answer for :attr:`chat_date` (or the real clock when None).

        transformers turns callables passed to ``apply_chat_template`` into strings, so the function is set on the
        compiled template itself (transformers caches one per template text; set before every rendering). Where
        that is not reachable, ``date_string`` (the variable Llama 3.x templates read first) is passed instead."""
        day = self.chat_date
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            compiled = _compile_jinja_template(self.hf.get_chat_template())
        except (ImportError, AttributeError, TypeError, ValueError):
            return {} if day is None else {"date_string": day.strftime("%d %b %Y")}
        if day is None:
            compiled.globals.pop("strftime_now", None)  # back to the environment's own (the real clock)
        else:
            pinned = _dt.datetime.combine(day, _dt.time(12, 0))
            compiled.globals["strftime_now"] = lambda fmt: pinned.strftime(fmt)
        return {}


def load_tokenizer(spec: str | os.PathLike[str]) -> Tokenizer:
    """``byte``, ``byte-chat``, an embedded model name (``tiny``, ``smollm2``) or a tokenizer directory."""
    s = str(spec)
    if s == "byte":
        return ByteTokenizer()
    if s == "byte-chat":
        return ByteTokenizer(chat=True)
    from evalctx.models.embedded import resolve_model

    resolved = resolve_model(s)
    return HFTokenizer(resolved.path, gguf_file=resolved.gguf_file)
