"""The order a replica runs its samples in, so that consecutive prompts share the longest prefix of token ids.

A sweep over needle depths at one length builds prompts that agree up to the earlier of two needles (instruction
and haystack), when the haystack and the seed allow: which prompts share what is read from their token ids, never
assumed from their depths. Any KV cache that keeps the previous prompt's prefix then computes only what differs:
the hf backend's ``prefix_reuse``, vLLM's automatic prefix caching, TensorRT-LLM's KV block reuse, llama.cpp's
slot cache.

Sorting a set of prompts lexicographically by token ids visits them in the depth-first order of their prefix trie,
so each prompt shares with the one before it the longest prefix any earlier prompt offers: with a cache of one
prompt, every trie node (distinct prefix token) is computed exactly once, which is the least any order can do.

Only the order changes: sample ids, prompts and which samples exist do not, so a resumed run is the same run.
"""

from __future__ import annotations

from typing import Protocol, Sequence, TypeVar

from evalctx.backends.base import common_prefix

WINDOW_TOKENS = 1 << 24
"""Prompt tokens built ahead and ordered together (at least one sample): 16M tokens hold an 11-depth sweep at 1M
and cost about 40 bytes a token as Python lists and text while they wait."""


class _Sized(Protocol):
    @property
    def context_length(self) -> int: ...

    @property
    def max_new_tokens(self) -> int: ...


S = TypeVar("S", bound=_Sized)


def prefix_windows(specs: Sequence[S], window_tokens: int = WINDOW_TOKENS) -> list[list[S]]:
    """``specs`` (one replica's, longest first) cut into windows whose prompts are built and ordered together.

    Specs of equal (context_length, max_new_tokens) are the ones that can share a batch and a prefix; they are
    brought together (longest first still, so an out-of-memory shows up at once; the incoming order otherwise),
    then cut every ``window_tokens`` prompt tokens."""
    ordered = sorted(specs, key=lambda s: (-s.context_length, s.max_new_tokens))
    out: list[list[S]] = []
    tokens = 0
    for s in ordered:
        same = bool(out) and (out[-1][0].context_length, out[-1][0].max_new_tokens) == \
            (s.context_length, s.max_new_tokens)
        if same and tokens + s.context_length <= window_tokens:
            out[-1].append(s)
            tokens += s.context_length
        else:
            out.append([s])
            tokens = s.context_length
    return out


class _Prompted(Protocol):
    @property
    def prompt_ids(self) -> list[int]: ...


P = TypeVar("P", bound=_Prompted)


def order_by_prefix(samples: Sequence[P]) -> list[P]:
    """``samples`` sorted lexicographically by ``prompt_ids`` (stable: equal prompts keep their order), so that
    consecutive prompts share the longest prefix (module docstring)."""
    return sorted(samples, key=lambda s: s.prompt_ids)


def computed_tokens(prompts: Sequence[Sequence[int]]) -> int:
    """Prompt tokens a cache of one prompt computes for ``prompts`` in this order (each prompt after the first
    reuses its common prefix with the one before, but always computes its last token)."""
    total, prev = 0, None
    for p in prompts:
        keep = 0 if prev is None else min(common_prefix(prev, p), len(p) - 1)
        total += len(p) - keep
        prev = p
    return total
