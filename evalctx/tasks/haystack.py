"""Filler sources as token streams: the text is tokenized once per tokenizer and then sliced, never re-tokenized.

A haystack is one *period* of text (e.g. one noise line plus its joiner, or a whole essay corpus plus a space) that
is cycled as often as the longest prompt needs. The cycled text is tokenized with ONE ``encode_with_offsets`` call
per tokenizer and the token start offsets are kept, so a window of N haystack tokens is a slice of the filler text
found by two binary searches. Doubling when a longer window is asked for keeps the total tokenization work below
twice the final stream.
"""

from __future__ import annotations

import hashlib
import re
from array import array
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from pathlib import Path

from evalctx.errors import UsageError
from evalctx.models.tokenizer import Tokenizer

NOISE_SENTENCE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
"""RULER's ``noise`` haystack sentence, which is also the InfiniteBench/TensorRT-LLM passkey noise line."""

DEFAULT_ESSAY_DIR = Path(__file__).resolve().parent.parent / "data" / "essays"
"""Original essays shipped with evalctx (see its README.md)."""
CHINESE_ESSAY_DIR = Path(__file__).resolve().parent.parent / "data" / "essays_zh"
"""Original Chinese essays shipped with evalctx: the ``essay_zh`` haystack."""
SHIPPED_ESSAYS = {DEFAULT_ESSAY_DIR: "essay", CHINESE_ESSAY_DIR: "essay_zh"}

# What may close a sentence after its terminator: quotes and brackets of Latin, CJK and other scripts.
_CLOSERS = "".join(re.escape(c) for c in "\"')]»”’」』）】》〉〕〗〙〛＂＇")
# Terminators that end a sentence by themselves: CJK full stops and marks (Chinese and Japanese put no space after
# them), the Devanagari danda, Arabic and Urdu marks, Armenian, Ethiopic, Myanmar and Khmer full stops.
_OWN_TERMINATORS = "".join(re.escape(c) for c in "。！？｡．।॥؟۔։።။។")
# A sentence ends at . ? ! followed by whitespace (a Latin full stop without it is 3.14 or e.g.), at one of the
# terminators above with or without whitespace, each optionally closed by quotes/brackets; a line break ends one too.
_SENTENCE_END = re.compile(rf"[.?!][{_CLOSERS}]*\s+|[{_OWN_TERMINATORS}]+[{_CLOSERS}]*\s*|\n")
_LINE_END = re.compile(r"\n")

_MIN_STREAM_CHARS = 4096


@dataclass
class TokenStream:
    """The cycled filler text and its tokenization: ``starts[i]`` is the character where token ``i`` starts."""

    text: str
    ids: array
    starts: array
    copies: int

    def __len__(self) -> int:
        return len(self.starts)

    def token_at(self, char: int) -> int:
        """Index of the first token starting at or after ``char``: the number of whole tokens before it."""
        return bisect_left(self.starts, char)

    def token_containing(self, char: int) -> int:
        return max(bisect_right(self.starts, char) - 1, 0)


class Haystack:
    """One filler source: ``text`` is one period of the cycled stream; needles go only at ``boundaries``.

    ``unit`` is ``line`` for the line-joined noise (RULER and TensorRT-LLM put needles between noise lines) and
    ``sentence`` otherwise (gkamradt and RULER's essay haystack put them between sentences).
    """

    def __init__(self, name: str, text: str, unit: str = "sentence") -> None:
        if not text.strip():
            raise UsageError(f"haystack {name!r} is empty")
        self.name = name
        self.text = text
        self.unit = unit
        pattern = _LINE_END if unit == "line" else _SENTENCE_END
        ends = [m.end() for m in pattern.finditer(text) if m.end() < len(text)]
        # 0 is always a boundary: every period starts a sentence (each period ends with its joiner).
        self.boundaries: list[int] = sorted({0, *ends})
        self.fingerprint = hashlib.sha1(f"{unit}\0{text}".encode()).hexdigest()[:16]
        self._streams: dict[str, TokenStream] = {}

    def __repr__(self) -> str:
        return f"Haystack({self.name!r}, {len(self.text)} chars/period, unit={self.unit})"

    @property
    def joiner(self) -> str:
        """What separates two units: a newline between lines, a space between sentences."""
        return "\n" if self.unit == "line" else " "

    def contains(self, s: str) -> bool:
        """Whether ``s`` occurs anywhere in the cycled text (including across the wrap-around of the period)."""
        return s in self.text + self.text[: max(len(s) - 1, 0)]

    # -- boundaries in stream coordinates (the stream is the period repeated) --------------------------------------
    def boundary_at_or_before(self, char: int) -> int:
        period = len(self.text)
        k, r = divmod(char, period)
        return k * period + self.boundaries[bisect_right(self.boundaries, r) - 1]

    def boundary_at_or_after(self, char: int) -> int:
        period = len(self.text)
        k, r = divmod(char, period)
        i = bisect_left(self.boundaries, r)
        return k * period + self.boundaries[i] if i < len(self.boundaries) else (k + 1) * period

    def is_boundary(self, char: int) -> bool:
        return self.boundary_at_or_before(char) == char

    # -- the token stream --------------------------------------------------------------------------------------------
    def stream(self, tokenizer: Tokenizer, min_tokens: int) -> TokenStream:
        """The cached token stream for ``tokenizer``, extended (doubling) until it holds ``min_tokens`` tokens."""
        key = tokenizer.fingerprint()
        st = self._streams.get(key)
        if st is not None and len(st) >= min_tokens:
            return st
        if st is None:
            copies = max(1, -(-_MIN_STREAM_CHARS // len(self.text)))
        else:
            # Grow by at least double; jump straight to the estimated size when far short of it.
            chars_per_token = len(st.text) / max(len(st), 1)
            want = int(min_tokens * chars_per_token * 1.1) + 1
            copies = max(2 * st.copies, -(-want // len(self.text)))
        while True:
            st = self._tokenize(tokenizer, copies)
            if len(st) >= min_tokens:
                break
            chars_per_token = len(st.text) / max(len(st), 1)
            want = int(min_tokens * chars_per_token * 1.1) + 1
            copies = max(2 * copies, -(-want // len(self.text)))
        self._streams[key] = st
        return st

    def _tokenize(self, tokenizer: Tokenizer, copies: int) -> TokenStream:
        text = self.text * copies
        # Filler is text: a special-token string in an essay stays characters (no template spans).
        ids, offsets = tokenizer.encode_with_offsets(text, add_special_tokens=False, special_spans=())
        return TokenStream(text, array("l", ids), array("l", [o[0] for o in offsets]), copies)


# -- the haystack kinds -----------------------------------------------------------------------------------------------
_CACHE: dict[tuple, Haystack] = {}


def noise_haystack(joiner: str = "\n") -> Haystack:
    """The repeated noise sentence; ``\\n`` joins lines (RULER, TensorRT-LLM), ``" "`` joins sentences (Landmark)."""
    key = ("noise", joiner)
    if key not in _CACHE:
        name = "noise" if joiner == "\n" else "noise_inline"
        _CACHE[key] = Haystack(name, NOISE_SENTENCE + joiner, unit="line" if joiner == "\n" else "sentence")
    return _CACHE[key]


def normalise_whitespace(raw: str) -> str:
    """Runs of spaces and tabs become one space and each line is stripped (RULER normalises essay whitespace so);
    line breaks stay where the text has them, one per run of blank lines: in scripts that put no space between
    sentences, and in verse or lists, a line end is the only sentence boundary there is."""
    lines = (re.sub(r"[^\S\n]+", " ", line).strip() for line in raw.splitlines())
    return "\n".join(line for line in lines if line)


def essay_haystack(haystack_dir: str | Path | None = None) -> Haystack:
    """``*.txt`` files of ``haystack_dir`` (default: the shipped essays) in name order, whitespace normalised
    (:func:`normalise_whitespace`) and joined by spaces."""
    folder = Path(haystack_dir).expanduser() if haystack_dir else DEFAULT_ESSAY_DIR
    if not folder.is_dir():
        raise UsageError(f"haystack_dir not found: {folder} (give a folder of .txt files)")
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise UsageError(f"haystack_dir {folder} has no .txt files")
    # Re-read when a file changes, but don't re-tokenize for every task instance of a run.
    key = ("essay", str(folder.resolve()), tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files))
    if key not in _CACHE:
        texts = []
        for f in files:
            try:
                raw = f.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise UsageError(f"haystack file {f} is not UTF-8 text: {exc}") from exc
            norm = normalise_whitespace(raw)
            if norm:
                texts.append(norm)
        if not texts:
            raise UsageError(f"haystack_dir {folder} holds only empty .txt files")
        name = SHIPPED_ESSAYS.get(folder.resolve(), f"essay:{folder.name}")
        _CACHE[key] = Haystack(name, " ".join(texts) + " ", unit="sentence")
    return _CACHE[key]


def get_haystack(kind: str, haystack_dir: str | Path | None = None, joiner: str = "\n") -> Haystack:
    """``noise``, ``essay`` or ``essay_zh`` (the shipped Chinese essays); ``haystack_dir`` only with ``essay``."""
    if kind in ("noise", "essay_zh") and haystack_dir:
        raise UsageError('option haystack_dir needs haystack = "essay"')
    if kind == "noise":
        return noise_haystack(joiner)
    if kind == "essay":
        return essay_haystack(haystack_dir)
    if kind == "essay_zh":
        return essay_haystack(CHINESE_ESSAY_DIR)
    raise UsageError(f"unknown haystack {kind!r}: choose noise, essay or essay_zh")
