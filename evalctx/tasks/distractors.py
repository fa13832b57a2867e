"""RULER's ``needle`` haystack: a haystack made of other needles (the distractor setting of niah_multikey_2/3).

NVIDIA/RULER ``scripts/data/synthetic/niah.py``: with ``type_haystack = needle`` every haystack line is the needle
template filled with a random key and value of the task's key and value kinds, ``"\\n"``-joined, and the real
needles go between lines. Here the distractor lines are one fixed, endless sequence (seeded by the two kinds), so
the haystack is the same for every sample and model, like the essay haystack, and it is tokenized once per
tokenizer and sliced like the others. It grows on demand instead of cycling: a repeated period would repeat the
same distractors. Distractor keys and values come from their own half of the strings
(:func:`evalctx.tasks.keys.in_distractor_pool`), so no distractor ever carries the asked key or an asked value.

Word keys are dealt from a shuffled deck of that half (9,642 adjective-noun pairs), not drawn with replacement:
drawn at random from so small a pool, keys would repeat within the first hundred lines (RULER draws from
wonderwords' millions of pairs, where a repeat is rare), and one distractor key would carry several values. Only
after the whole deck (9,642 lines, about 240K tokens at 25 tokens a line) does a key come again, in a reshuffled
deck. Number and uuid
keys and values are drawn at random: their pools are millions of strings.
"""

from __future__ import annotations

import hashlib
import random
import re

from evalctx.tasks.haystack import Haystack, TokenStream
from evalctx.tasks.keys import distractor_words, draw_pooled, in_distractor_pool
from evalctx.models.tokenizer import Tokenizer

_VERSION = 2  # 2: word keys dealt from a deck, never repeated within it. Bump when the generated lines change: the fingerprint enters every sample id
_FIRST_LINES = 256


class DistractorHaystack(Haystack):
    """An endless, deterministic sequence of needle lines whose keys and values are never asked.

    ``text`` is the part generated so far; it only ever grows, so every earlier text (and token stream) is a
    prefix of the later ones and the boundary arithmetic of :class:`Haystack` (period = the whole text) holds.
    """

    def __init__(self, template: str, key_type: str, value_type: str) -> None:
        """``template``: the needle with ``{type_v}``, ``{key}`` and ``{value}`` fields (``type_v`` = the plural
        value kind, as RULER fills its distractors)."""
        self.template, self.key_type, self.value_type = template, key_type, value_type
        spec = f"{template}|{key_type}|{value_type}|{_VERSION}"
        self._rng = random.Random(spec)  # a str seed is hashed with sha512: the same lines in every process
        self._decks: dict[str, list[str]] = {"key": [], "value": []}
        super().__init__("needle", self._lines(_FIRST_LINES), unit="line")
        # Keyed by what generates the lines, not by how many of them exist yet.
        self.fingerprint = hashlib.sha1(f"needle\0{spec}".encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"DistractorHaystack({self.key_type!r}, {self.value_type!r}, {len(self.text)} chars so far)"

    def _draw(self, role: str, kind: str) -> str:
        """The next distractor key or value (``role``) of ``kind``: words from the role's deck, reshuffled when
        spent; numbers and uuids at random from the distractor half."""
        if kind != "words":
            return draw_pooled(kind, self._rng, True)
        deck = self._decks[role]
        if not deck:
            deck.extend(distractor_words())
            self._rng.shuffle(deck)
        return deck.pop()

    def _lines(self, n: int) -> str:
        return "".join(self.template.format(type_v=self.value_type, key=self._draw("key", self.key_type),
                                            value=self._draw("value", self.value_type)) + "\n" for _ in range(n))

    def _grow(self, chars: int) -> None:
        n_lines = self.text.count("\n")
        while len(self.text) < chars:
            self.text += self._lines(n_lines)  # doubling: total generation stays linear
            n_lines *= 2
        self.boundaries = [0] + [m.end() for m in re.finditer("\n", self.text) if m.end() < len(self.text)]

    def contains(self, s: str) -> bool:
        """Whether ``s`` may be a distractor's key or value: decided by the pools, at any length."""
        return in_distractor_pool(s)

    def stream(self, tokenizer: Tokenizer, min_tokens: int) -> TokenStream:
        """The token stream of the text so far for ``tokenizer``, the text grown first when it is too short."""
        key = tokenizer.fingerprint()
        while True:
            st = self._streams.get(key)
            if st is not None and len(st) >= min_tokens:
                return st
            if st is None or len(st.text) < len(self.text):  # another tokenizer grew the text meanwhile
                st = self._streams[key] = self._tokenize(tokenizer, 1)
                if len(st) >= min_tokens:
                    return st
            chars_per_token = len(st.text) / max(len(st), 1)
            self._grow(max(2 * len(self.text), int(min_tokens * chars_per_token * 1.1) + 1))


_CACHE: dict[tuple[str, str, str], DistractorHaystack] = {}


def distractor_haystack(template: str, key_type: str, value_type: str) -> DistractorHaystack:
    """The shared distractor haystack of one needle template and key and value kinds (tokenized once per tokenizer
    per process)."""
    key = (template, key_type, value_type)
    if key not in _CACHE:
        _CACHE[key] = DistractorHaystack(template, key_type, value_type)
    return _CACHE[key]
