"""A KV cache allocated once for prompt plus budget, written in place: no per-chunk copies of the whole cache; sliding
and chunked layers hold only their window; keys and values optionally stored in fp8 or int8.

transformers' DynamicCache concatenates every chunk onto the cache so far (``torch.cat``), which copies the whole
cache once per prefill chunk and once per decoded token: at 1M tokens, hundreds of gigabytes moved for nothing,
and twice the cache in memory at the moment of the copy. Here each layer owns buffers of ``capacity`` positions;
``update`` copies the new chunk into place and returns views of the filled part, so attention sees exactly the
keys so far (no padding to mask out, shapes as DynamicCache gives them).

Each buffer is laid out position-major, (capacity, batch, kv_heads, head_dim), and handed out as the permuted view
(batch, kv_heads, positions, head_dim): the strides then do not depend on the capacity, so attention kernels that
plan per shape and stride (cuDNN) reuse their plans across prompts of different lengths.

**Windows.** A sliding-window or chunked-attention layer (:mod:`evalctx.capacity.kv_layout`) is a :class:`WindowLayer`: a
buffer of ``W - 1 + step`` positions holding the most recent ones; when a chunk would not fit, the last W-1 are
moved to the front. It reports the absolute offset of its first held key through ``get_mask_sizes``, as
transformers' DynamicSlidingWindowLayer does, so the model's own sliding or chunked mask (built from absolute
positions) masks exactly what it masks over the whole sequence.

**Prefix reuse.** :meth:`PreallocatedCache.crop_to` keeps the first n positions (the rest is overwritten by the
next update), :meth:`PreallocatedCache.keeps` says whether a prefix of n can be kept, and ``length`` says how many
positions hold valid keys. A window layer cropped to n needs the W-1 positions before n: with ``reuse_every`` it
snapshots them at every multiple of it during prefill (the backend reuses whole prefill chunks).

**KV precision.** With ``kv_dtype`` fp8 (e4m3) or int8 each position's keys and values are stored quantized with
one float32 scale per KV head (absolute maximum / 448 or / 127), or with "fp8_tensor" cast to e4m3 with one scale
of 1 per tensor (an engine's fp8 cache without calibrated scales), and ``update`` returns them dequantized to the
model dtype: every key attention reads, the current chunk's included, went through the quantized cache, as in a
serving engine's paged attention over an fp8 cache (vLLM). The dequantized copy is one layer's at a time.
"""

from __future__ import annotations

from typing import Any, Sequence

from transformers.cache_utils import Cache, CacheLayerMixin

_QMAX = {"fp8": 448.0, "fp8_tensor": 448.0, "int8": 127.0}


class CacheFullError(RuntimeError):
    """An update would write past the preallocated capacity (a sizing bug: the backend sizes prompt + budget)."""


class _Store:
    """Position-major K and V buffers (positions, batch, heads, dim), in the model dtype, or quantized
    (:data:`evalctx.capacity.kv_layout.QUANTIZED_KV`): "fp8"/"int8" with a float32 scale per position and head, "fp8_tensor"
    with one scale of 1 for the whole tensor (values saturate at +-448)."""

    def __init__(self, size: int, key_states: Any, value_states: Any, kv_dtype: str | None) -> None:
        import torch

        batch, heads, _, k_dim = key_states.shape
        self.dtype, self.device, self.kv_dtype = key_states.dtype, key_states.device, kv_dtype
        store = {"fp8": torch.float8_e4m3fn, "fp8_tensor": torch.float8_e4m3fn,
                 "int8": torch.int8}.get(kv_dtype or "", self.dtype)
        dims = (k_dim, value_states.shape[-1])
        # empty, not zeros: only written positions are ever read.
        self.k, self.v = (torch.empty((size, batch, heads, d), dtype=store, device=self.device) for d in dims)
        self.k_scale = self.v_scale = None
        if kv_dtype in ("fp8", "int8"):
            self.k_scale, self.v_scale = (torch.empty((size, batch, heads, 1), dtype=torch.float32,
                                                      device=self.device) for _ in dims)

    @property
    def size(self) -> int:
        return int(self.k.shape[0])

    def _quantize(self, x: Any, data: Any, scale: Any) -> None:
        import torch

        qmax = _QMAX[self.kv_dtype or ""]
        xf = x.to(torch.float32, copy=True)  # a copy: the model's own key/value tensors stay as they were
        if scale is not None:
            s = xf.abs().amax(dim=-1, keepdim=True).div_(qmax).clamp_min_(1e-12)
            xf.div_(s)
            scale.copy_(s)
        if self.kv_dtype == "int8":
            xf.round_()
        data.copy_(xf.clamp_(-qmax, qmax).to(data.dtype))  # clamped: a cast to e4m3 does not saturate

    def write(self, start: int, key_states: Any, value_states: Any) -> None:
        """Write (batch, heads, n, dim) states at positions start..start+n."""
        end = start + key_states.shape[-2]
        k, v = key_states.permute(2, 0, 1, 3), value_states.permute(2, 0, 1, 3)
        if self.kv_dtype is None:
            self.k[start:end].copy_(k)
            self.v[start:end].copy_(v)
        else:
            self._quantize(k, self.k[start:end], None if self.k_scale is None else self.k_scale[start:end])
            self._quantize(v, self.v[start:end], None if self.v_scale is None else self.v_scale[start:end])

    def read(self, start: int, end: int) -> tuple[Any, Any]:
        """Positions start..end as (batch, heads, n, dim) tensors in the model dtype (views when not quantized).
        Scaled values are multiplied in float32, then cast: a scale cast to fp16 would underflow for small
        vectors, and one rounded to bf16 would err by up to 0.4% on every element."""
        import torch

        if self.kv_dtype is None:
            return _view(self.k[start:end]), _view(self.v[start:end])
        out = []
        for data, scale in ((self.k, self.k_scale), (self.v, self.v_scale)):
            if scale is None:
                out.append(_view(data[start:end].to(self.dtype)))
            else:
                out.append(_view(data[start:end].to(torch.float32).mul_(scale[start:end]).to(self.dtype)))
        return out[0], out[1]

    def buffers(self) -> list[Any]:
        return [b for b in (self.k, self.v, self.k_scale, self.v_scale) if b is not None]

    def copy_within(self, src: int, dst: int, n: int) -> None:
        """Move positions src..src+n to dst..dst+n (the ranges may overlap)."""
        for buf in self.buffers():
            buf[dst:dst + n] = buf[src:src + n].clone()

    def take(self, start: int, end: int) -> list[Any]:
        return [b[start:end].clone() for b in self.buffers()]

    def put(self, start: int, saved: list[Any]) -> None:
        import torch

        with torch.inference_mode():  # the buffers are inference tensors; a crop may come from outside the mode
            for buf, part in zip(self.buffers(), saved):
                buf[start:start + part.shape[0]].copy_(part)

    def resized(self, size: int, keep: int) -> "_Store":
        """A store of ``size`` positions holding this one's first ``keep``."""
        new = object.__new__(_Store)
        new.__dict__.update(self.__dict__)
        new.k, new.v = (b.new_empty((size, *b.shape[1:])) for b in (self.k, self.v))
        if self.kv_dtype:
            new.k_scale, new.v_scale = (b.new_empty((size, *b.shape[1:])) for b in (self.k_scale, self.v_scale))
        for old, fresh in zip(self.buffers(), new.buffers()):
            fresh[:keep].copy_(old[:keep])
        return new


def _view(buffer: Any) -> Any:
    """(positions, batch, heads, dim) storage as the (batch, heads, positions, dim) tensor models expect."""
    return buffer.permute(1, 2, 0, 3)


class PreallocatedLayer(CacheLayerMixin):
    """One full-attention layer's keys and values for ``capacity`` positions, allocated on first update (then
    batch, dtype, device and this rank's KV heads are known). ``keys``/``values`` are (batch, kv_heads, positions,
    head_dim) views of what is held."""

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self, capacity: int, kv_dtype: str | None = None) -> None:
        super().__init__()
        self.capacity = capacity
        self.kv_dtype = kv_dtype
        self.length = 0
        self.store: _Store | None = None

    def lazy_initialization(self, key_states: Any, value_states: Any) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.store = _Store(self._size(), key_states, value_states, self.kv_dtype)
        self.is_initialized = True

    def _size(self) -> int:
        return self.capacity

    def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise CacheFullError(f"KV cache of {self.capacity} positions cannot take {end}")
        assert self.store is not None
        self.store.write(self.length, key_states, value_states)
        self.length = end
        return self._hand_out(*self.store.read(0, end))

    def _hand_out(self, keys: Any, values: Any) -> tuple[Any, Any]:
        # Views of the buffers are kept as transformers' layers keep theirs; a dequantized copy is not, or every
        # layer's would stay alive at once.
        if self.kv_dtype is None:
            self.keys, self.values = keys, values
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.capacity

    def crop(self, tokens_to_remove: int) -> None:
        """transformers' convention: a negative value removes that many positions, a positive one keeps that many."""
        n = max(0, self.length + tokens_to_remove) if tokens_to_remove < 0 else min(self.length, tokens_to_remove)
        self.crop_to(n)

    def keeps(self, n: int) -> bool:
        """Whether the first ``n`` positions can be kept (always, up to the length held)."""
        return n <= self.length

    def crop_to(self, n: int) -> None:
        self.length = min(self.length, n)

    def reset(self) -> None:
        self.length = 0

    def grow(self, capacity: int) -> None:
        """Reallocate to ``capacity`` positions, keeping the first ``length``."""
        if capacity <= self.capacity:
            return
        if self.store is not None:
            self.store = self.store.resized(capacity, self.length)
        self.capacity = capacity

    def held_bytes(self) -> int:
        """Bytes of this layer's buffers (0 before the first update)."""
        return sum(b.numel() * b.element_size() for b in self.store.buffers()) if self.store else 0


class WindowLayer(PreallocatedLayer):
    """A sliding-window (or chunked-attention) layer of ``window`` positions that holds only the W-1 positions a
    prefill chunk of up to ``step`` positions needs before it, plus the chunk: the buffer holds absolute positions
    ``start..length``; a chunk that would overflow it first moves the last W-1 to the front. The keys handed to
    attention start at ``start``, which ``get_mask_sizes`` reports as ``kv_offset``. With ``reuse_every`` the W-1
    positions before every multiple of it are snapshotted while ``recording`` (the prefill), so a later prompt can
    crop to any of those boundaries."""

    is_sliding = True

    def __init__(self, capacity: int, window: int, step: int, kv_dtype: str | None = None,
                 reuse_every: int = 0) -> None:
        super().__init__(capacity, kv_dtype)
        self.window = window
        self.keep = window - 1
        self.step = max(1, step)
        self.start = 0
        self.reuse_every = reuse_every
        self.recording = False
        self.snapshots: dict[int, tuple[int, list[Any]]] = {}

    def _size(self) -> int:
        return self.keep + self.step

    def _start_after(self, query_length: int) -> int:
        """``start`` once an update of ``query_length`` positions has made room for itself."""
        held = self.length - self.start
        if self.store is None or held + query_length <= self.store.size:
            return self.start
        return self.length - min(held, self.keep)

    def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        assert self.store is not None
        q = key_states.shape[-2]
        end = self.length + q
        if end > self.capacity:
            raise CacheFullError(f"KV cache of {self.capacity} positions cannot take {end}")
        if self.recording and self.reuse_every and self.length and self.length % self.reuse_every == 0:
            self._snapshot()
        start = self._start_after(q)
        if start != self.start:
            self.store.copy_within(start - self.start, 0, self.length - start)
            self.start = start
        if self.length - self.start + q > self.store.size:  # a query longer than the step it was sized for
            self.store = self.store.resized(self.length - self.start + q, self.length - self.start)
        self.store.write(self.length - self.start, key_states, value_states)
        self.length = end
        return self._hand_out(*self.store.read(0, end - self.start))

    def _snapshot(self) -> None:
        assert self.store is not None
        if self.length in self.snapshots:
            return
        first = max(self.start, self.length - self.keep)
        self.snapshots[self.length] = (first, self.store.take(first - self.start, self.length - self.start))

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        start = self._start_after(query_length)
        return self.length - start + query_length, start

    def keeps(self, n: int) -> bool:
        if n > self.length:
            return False
        return n == 0 or self.start <= max(0, n - self.keep) or n in self.snapshots

    def crop_to(self, n: int) -> None:
        if n >= self.length:
            return
        for b in [b for b in self.snapshots if b > n]:
            del self.snapshots[b]
        if n == 0:
            self.length = self.start = 0
        elif self.start <= max(0, n - self.keep):
            self.length = n
        elif n in self.snapshots:
            assert self.store is not None
            first, saved = self.snapshots[n]
            self.store.put(0, saved)
            self.start, self.length = first, n
        else:
            raise CacheFullError(f"a window layer cannot keep {n} positions: it holds {self.start}..{self.length}")

    def reset(self) -> None:
        self.length = self.start = 0
        self.snapshots.clear()

    def grow(self, capacity: int) -> None:
        self.capacity = max(self.capacity, capacity)  # the buffer's size does not depend on the sequence length

    def held_bytes(self) -> int:
        snaps = sum(t.numel() * t.element_size() for _, saved in self.snapshots.values() for t in saved)
        return super().held_bytes() + snaps


def model_windows(config: Any) -> tuple[int | None, ...] | None:
    """Per decoder layer of a transformers ``config``, its attention window (None: full), as
    :func:`evalctx.capacity.kv_layout.layer_windows` reads it, when transformers' own reading
    (``get_layer_types_and_kwargs``, which its DynamicCache and masks follow, where the release has it) agrees;
    None otherwise (every layer kept whole: never a window the model's mask does not apply)."""
    from evalctx.capacity.kv_layout import layer_windows

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    ours = layer_windows(text.to_dict())
    if ours is None:
        return None
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs
    except ImportError:  # older releases: their masks read the same config fields as layer_windows
        return ours
    try:
        types, kwargs = get_layer_types_and_kwargs(text)
    except (AttributeError, TypeError, ValueError):
        return None
    if len(types) != len(ours) or any((t == "full_attention") != (w is None) for t, w in zip(types, ours)):
        return None  # transformers reads the layer kinds otherwise
    # Where this release gives per-layer kwargs, the windows must agree too (some releases return other shapes).
    theirs = [kw.get("sliding_window") for kw in kwargs if isinstance(kw, dict)] if len(kwargs) == len(ours) else []
    if len(theirs) == len(ours) and any(w is not None and t != w for t, w in zip(theirs, ours)):
        return None
    return ours


class PreallocatedCache(Cache):
    """A :class:`transformers.Cache` for ``batch`` sequences of up to ``capacity`` positions each: one layer per
    decoder layer, :class:`PreallocatedLayer` for full attention and :class:`WindowLayer` where ``layers`` gives a
    window (``layers``: an int for that many full layers, or per layer None or the window, as
    :func:`evalctx.capacity.kv_layout.layer_windows` returns). ``step``: the longest query (the prefill chunk; 0 = the
    whole prompt, which keeps every layer whole); ``reuse_every``: the prefix-reuse granularity (0 = no reuse);
    ``kv_dtype``: None (the model dtype), "fp8" or "int8". Buffers are allocated on each layer's first update
    (then the device, dtype and this rank's KV heads under tensor parallelism are known)."""

    def __init__(self, layers: int | Sequence[int | None], capacity: int, batch: int, *, step: int = 0,
                 reuse_every: int = 0, kv_dtype: str | None = None) -> None:
        from evalctx.capacity.kv_layout import window_positions

        windows: Sequence[int | None] = [None] * layers if isinstance(layers, int) else layers
        made: list[PreallocatedLayer] = []
        for w in windows:
            if w is not None and window_positions(w, capacity, step=step, reuse_every=reuse_every) < capacity:
                made.append(WindowLayer(capacity, w, step, kv_dtype, reuse_every))
            else:
                made.append(PreallocatedLayer(capacity, kv_dtype))
        super().__init__(layers=made)
        self.batch = batch
        self.kv_dtype = kv_dtype

    @property
    def capacity(self) -> int:
        return min(layer.capacity for layer in self.layers)

    @property
    def length(self) -> int:
        """Positions that hold valid keys and values (the same in every layer between forward passes)."""
        return self.layers[0].length

    def recording(self, on: bool) -> None:
        """Snapshot window layers at reuse boundaries while on (during a prefill)."""
        for layer in self.layers:
            if isinstance(layer, WindowLayer):
                layer.recording = on

    def keeps(self, n: int) -> bool:
        """Whether every layer can keep the first ``n`` positions (:meth:`crop_to`)."""
        return all(layer.keeps(n) for layer in self.layers)

    def crop_to(self, n: int) -> None:
        """Keep the first ``n`` positions (a shared prompt prefix; :meth:`keeps` must allow it); later updates
        overwrite the rest."""
        for layer in self.layers:
            layer.crop_to(n)

    def reserve(self, capacity: int) -> None:
        """Make room for ``capacity`` positions per sequence, keeping what is cached."""
        for layer in self.layers:
            layer.grow(capacity)

    def held_bytes(self) -> int:
        """Bytes the cache's buffers and snapshots take now."""
        return sum(layer.held_bytes() for layer in self.layers)
