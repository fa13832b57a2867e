"""Who runs what, in which order: specs sharded over replicas (longest first, balanced by tokens) and cut into
batches of equal length and budget (the order within a replica is :mod:`.prefix_order`'s)."""

from __future__ import annotations

from typing import Sequence, TypeVar

from evalctx.records import Sample
from evalctx.run.sampling import SampleSpec

S = TypeVar("S", SampleSpec, Sample)


def shard(specs: Sequence[SampleSpec], n_replicas: int) -> list[list[SampleSpec]]:
    """Longest-processing-time-first: each spec goes to the replica with the fewest tokens so far; within a replica
    the longest prompts run first so an out-of-memory shows up at once."""
    loads = [0] * n_replicas
    shards: list[list[SampleSpec]] = [[] for _ in range(n_replicas)]
    for s in sorted(specs, key=lambda s: (-s.context_length, s.id)):
        r = min(range(n_replicas), key=lambda i: (loads[i], i))
        shards[r].append(s)
        loads[r] += s.context_length + s.max_new_tokens
    return shards


def batches(specs: Sequence[S], batch_size: int) -> list[list[S]]:
    """Consecutive specs (or samples) of equal length and budget, at most ``batch_size`` each (equal lengths need no
    padding)."""
    out: list[list[S]] = []
    for s in specs:
        if out and len(out[-1]) < batch_size and out[-1][0].context_length == s.context_length \
                and out[-1][0].max_new_tokens == s.max_new_tokens:
            out[-1].append(s)
        else:
            out.append([s])
    return out
