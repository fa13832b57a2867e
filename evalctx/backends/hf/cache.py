"""A KV cache allocated once for prompt plus budget, written in place: no per-chunk copies of the whole cache.

transformers' DynamicCache concatenates every chunk onto the cache so far (``torch.cat``), which copies the whole
cache once per prefill chunk and once per decoded token: at 1M tokens, hundreds of gigabytes moved for nothing,
and twice the cache in memory at the moment of the copy. Here each layer owns ``keys``/``values`` buffers of
``capacity`` positions; ``update`` copies the new chunk into place and returns views of the filled part, so
attention sees exactly the keys so far (no padding to mask out, shapes as DynamicCache gives them).

Each buffer is laid out position-major, (capacity, batch, kv_heads, head_dim), and handed out as the permuted view
(batch, kv_heads, positions, head_dim): the strides then do not depend on the capacity, so attention kernels that
plan per shape and stride (cuDNN) reuse their plans across prompts of different lengths.

The cache is built for prefix reuse: :meth:`PreallocatedCache.crop_to` keeps the first n positions (the rest is
overwritten by the next update), :meth:`PreallocatedCache.reserve` grows the capacity keeping the contents, and
``length`` says how many positions hold valid keys.
"""

from __future__ import annotations

from typing import Any

from transformers.cache_utils import Cache, CacheLayerMixin


class CacheFullError(RuntimeError):
    """An update would write past the preallocated capacity (a sizing bug: the backend sizes prompt + budget)."""


class PreallocatedLayer(CacheLayerMixin):
    """One layer's keys and values for ``capacity`` positions, allocated on first update (then batch, dtype, device
    and this rank's KV heads are known). ``keys``/``values`` are (batch, kv_heads, capacity, head_dim) views."""

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: Any, value_states: Any) -> None:
        import torch

        batch, heads, _, k_dim = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        # empty, not zeros: only positions < length are ever read.
        self._keys = torch.empty((self.capacity, batch, heads, k_dim), dtype=self.dtype, device=self.device)
        self._values = torch.empty((self.capacity, batch, heads, value_states.shape[-1]), dtype=value_states.dtype,
                                   device=self.device)
        self.keys, self.values = self._view(self._keys), self._view(self._values)
        self.is_initialized = True

    @staticmethod
    def _view(buffer: Any) -> Any:
        """(positions, batch, heads, dim) storage as the (batch, heads, positions, dim) tensor models expect."""
        return buffer.permute(1, 2, 0, 3)

    def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise CacheFullError(f"KV cache of {self.capacity} positions cannot take {end}")
        self._keys[self.length:end].copy_(key_states.permute(2, 0, 1, 3))
        self._values[self.length:end].copy_(value_states.permute(2, 0, 1, 3))
        self.length = end
        return self._view(self._keys[:end]), self._view(self._values[:end])

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.capacity

    def crop(self, tokens_to_remove: int) -> None:
        """transformers' convention: a negative value removes that many positions, a positive one keeps that many."""
        self.length = max(0, self.length + tokens_to_remove) if tokens_to_remove < 0 \
            else min(self.length, tokens_to_remove)

    def reset(self) -> None:
        self.length = 0

    def grow(self, capacity: int) -> None:
        """Reallocate to ``capacity`` positions, keeping the first ``length``."""
        if capacity <= self.capacity:
            return
        if self.is_initialized:
            old_k, old_v = self._keys, self._values
            self._keys = old_k.new_empty((capacity, *old_k.shape[1:]))
            self._values = old_v.new_empty((capacity, *old_v.shape[1:]))
            self._keys[:self.length].copy_(old_k[:self.length])
            self._values[:self.length].copy_(old_v[:self.length])
            self.keys, self.values = self._view(self._keys), self._view(self._values)
        self.capacity = capacity


class PreallocatedCache(Cache):
    """A :class:`transformers.Cache` of :class:`PreallocatedLayer`, one per decoder layer, for ``batch`` sequences
    of up to ``capacity`` positions each. Buffers are allocated on each layer's first update (then the device,
    dtype and this rank's KV heads under tensor parallelism are known)."""

    def __init__(self, num_layers: int, capacity: int, batch: int) -> None:
        super().__init__(layers=[PreallocatedLayer(capacity) for _ in range(num_layers)])
        self.batch = batch

    @property
    def capacity(self) -> int:
        return min(layer.capacity for layer in self.layers)

    @property
    def length(self) -> int:
        """Positions that hold valid keys and values (the same in every layer between forward passes)."""
        return self.layers[0].length

    def crop_to(self, n: int) -> None:
        """Keep the first ``n`` positions (a shared prompt prefix); later updates overwrite the rest."""
        for layer in self.layers:
            layer.length = min(layer.length, n)

    def reserve(self, capacity: int) -> None:
        """Make room for ``capacity`` positions per sequence, keeping what is cached."""
        for layer in self.layers:
            layer.grow(capacity)
