"""The hf backend's memory preflight: whether the weights, and then each sample's KV cache and activations, fit
one device of the replica, decided from the configuration and :mod:`evalctx.capacity.memory`'s arithmetic alone (every rank
decides the same), with the numbers and what would fit."""

from __future__ import annotations

import sys
from typing import Any

from evalctx.errors import UsageError


class MemoryCheck:
    """Per-device capacity and model shape of one hf backend; ``note`` says why the check is off (CPU without
    ``memory_gb``, an unreadable config)."""

    def __init__(self, config: Any, model_path: str, *, device: Any, memory_gb: float, chunk_size: int, tp: int,
                 dtype: str, attention: str, announce: bool, kv_dtype: str | None = None,
                 windows: Any = None, reuse_every: int = 0) -> None:
        import torch

        from evalctx.capacity.plan import GB, shape_from_hf

        self.torch = torch
        self.device = device
        self.memory_gb = memory_gb
        self.chunk_size = chunk_size
        self.tp = tp
        self.dtype = dtype
        self.attention = attention
        self.kv = {"kv_dtype": kv_dtype, "windows": windows, "reuse_every": reuse_every}
        self.shape: Any = None
        self.capacity: float | None = None
        self.note = ""
        if config is not None:
            try:
                self.shape = shape_from_hf(config.to_dict(), model_path)
            except UsageError as exc:
                self.note = f"off: {exc}"
        if memory_gb:
            self.capacity = memory_gb * GB
        elif device.type == "cuda":
            self.capacity = float(torch.cuda.get_device_properties(device).total_memory)
        else:
            self.note = "off on CPU (set memory_gb to plan for a memory size)"
            return
        if config is None:
            self.note = "off: the model config could not be read"
        if self.note and announce:
            print(f"evalctx: hf memory preflight {self.note}", file=sys.stderr)

    @property
    def on(self) -> bool:
        return self.shape is not None and self.capacity is not None

    def memory(self, tokens: int, batch: int = 1, tp: int | None = None) -> Any:
        from evalctx.capacity.memory import hf_rank_memory

        return hf_rank_memory(self.shape, tokens, chunk=self.chunk_size, batch=batch, tp=tp or self.tp,
                              dtype=self.dtype, attention=self.attention, **self.kv)

    def layout_text(self, tokens: int | None = None) -> str | None:
        """The KV cache's layers by kind and its precision (for the manifest), for ``tokens`` positions (the run's
        longest prompt plus budget; default: the model's stated positions, else 131,072), which the text names;
        None when the model's shape could not be read."""
        if self.shape is None:
            return None
        n = tokens or self.shape.max_position_embeddings or 131072
        return f"at {n:,} positions: {self.memory(n).layout_text()}"

    def capacity_text(self) -> str:
        from evalctx.capacity.plan import GB

        return f"{self.memory_gb:g} GB (memory_gb)" if self.memory_gb else \
            f"{self.capacity / GB:.1f} GB on {self.torch.cuda.get_device_name(self.device)}"

    def check_weights_fit(self) -> None:
        """Refuse before loading when even a one-token sample cannot fit: more tp is the only way out."""
        if not self.on:
            return
        mem = self.memory(1)
        if not mem.fits(self.capacity):
            bigger = self.fitting_tp(1)
            fix = f"raise tp (tp={bigger} fits)" if bigger else \
                "no tp up to 16 fits it: " + ("raise memory_gb" if self.memory_gb else "use larger GPUs")
            raise UsageError(f"backend hf: the model needs {mem.breakdown()} at tp={self.tp} before any context, "
                             f"more than the {self.capacity_text()}: {fix}")

    def fitting_tp(self, tokens: int) -> int | None:
        """The smallest tp above this one (dividing the heads) at which ``tokens`` positions fit, if any."""
        heads, kv = self.shape.num_attention_heads, self.shape.num_kv_heads
        return next((t for t in (2, 4, 8, 16) if t > self.tp and heads % t == 0 and kv % t == 0
                     and self.memory(tokens, tp=t).fits(self.capacity)), None)

    def reason(self, prompt: int, budget: int) -> str | None:
        """Why ``prompt`` tokens plus ``budget`` new ones do not fit (with what would), or None when they do."""
        from evalctx.capacity.memory import longest_fitting

        mem = self.memory(prompt + budget)
        if mem.fits(self.capacity):
            return None
        bigger = self.fitting_tp(prompt + budget)
        longest = longest_fitting(self.shape, self.capacity, chunk=self.chunk_size, tp=self.tp, dtype=self.dtype,
                                  attention=self.attention, **self.kv)
        fixes = [f"tp={bigger} fits it"] if bigger else []
        fixes.append(f"lengths <= {max(0, longest - budget)} fit at tp={self.tp}")
        return (f"prompt {prompt} + max_new_tokens {budget} needs {mem.breakdown()} at tp={self.tp}, more than the "
                f"{self.capacity_text()}: {'; '.join(fixes)}")

    def max_batch(self, tokens: int, wanted: int) -> int:
        """The largest batch of ``tokens``-position sequences (at most ``wanted``) that fits one device."""
        if not self.on:
            return wanted
        b = wanted
        while b > 1 and not self.memory(tokens, batch=b).fits(self.capacity):
            b -= 1
        return b

    def describe(self) -> str:
        from evalctx.capacity.plan import GB

        return self.note or f"on: {self.capacity / GB:.1f} GB per device"
