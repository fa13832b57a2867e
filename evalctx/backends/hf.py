"""Hugging Face transformers backend: greedy decoding with chunked prefill, on CPU or CUDA, offline.

Chunked prefill keeps activation memory bounded at long context: the prompt goes through the model ``chunk_size``
tokens at a time into a KV cache, computing logits for the last position only. TTFT is the prefill time (through
the first generated token); latency covers decode too.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

from evalctx.backends.base import Backend, BackendContext
from evalctx.errors import UsageError, require_extra
from evalctx.records import GenerationRequest, GenerationResult

_DTYPES = ("auto", "float32", "bfloat16", "float16")
LOWER_RIGHT_SDPA = "evalctx_sdpa"


def register_lower_right_sdpa() -> None:
    """Register ``attn_implementation="evalctx_sdpa"``: SDPA with a lower-right causal bias and no mask tensor.

    With a KV cache, a prefill chunk of c queries attends to all k keys so far. Stock "sdpa" builds a boolean
    (c x k) mask for that, which at 1M tokens costs gigabytes and keeps SDPA off its fastest kernels;
    ``causal_lower_right(c, k)`` states the same causality without a tensor. Valid for causal models without
    padding or sliding windows, which is what this backend feeds (equal-length batches).
    """
    import torch
    from torch.nn.attention.bias import causal_lower_right
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    def attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
                  scaling: float | None = None, **kwargs: Any) -> tuple[Any, None]:
        q_len, k_len = query.shape[-2], key.shape[-2]
        if key.shape[1] != query.shape[1]:  # grouped-query attention: share each KV head across its group
            rep = query.shape[1] // key.shape[1]
            key = key.repeat_interleave(rep, dim=1)
            value = value.repeat_interleave(rep, dim=1)
        if q_len == 1:
            out = torch.nn.functional.scaled_dot_product_attention(query, key, value, scale=scaling)
        elif q_len == k_len:
            out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
        else:
            out = torch.nn.functional.scaled_dot_product_attention(
                query, key, value, attn_mask=causal_lower_right(q_len, k_len), scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    def no_mask(*args: Any, **kwargs: Any) -> None:
        return None

    AttentionInterface.register(LOWER_RIGHT_SDPA, attention)
    AttentionMaskInterface.register(LOWER_RIGHT_SDPA, no_mask)


# Architectures whose attention is plain causal softmax attention (no soft-capping, sinks or ALiBi), so the
# lower-right SDPA computes exactly what their own attention would.
_PLAIN_CAUSAL = {"llama", "mistral", "qwen2", "qwen3", "granite", "olmo", "olmo2", "phi3", "smollm3"}


def auto_attention(resolved: Any, on_cuda: bool) -> str:
    """The lower-right SDPA on CUDA for plain causal models; stock sdpa elsewhere (on CPU its gain is nil: the
    default CPU run took 140 s with it and 126 s without)."""
    from transformers import AutoConfig

    if not on_cuda:
        return "sdpa"

    kw: dict[str, Any] = {"local_files_only": True}
    if resolved.gguf_file:
        kw["gguf_file"] = resolved.gguf_file
    try:
        cfg = AutoConfig.from_pretrained(str(resolved.path), **kw)
    except (OSError, ValueError):
        return "sdpa"  # the model load below reports the real problem
    sliding = getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True)
    layer_types = getattr(cfg, "layer_types", None) or []
    if cfg.model_type in _PLAIN_CAUSAL and not sliding and all(t == "full_attention" for t in layer_types):
        return LOWER_RIGHT_SDPA
    return "sdpa"


class HFBackend(Backend):
    name: ClassVar[str] = "hf"
    # No preflight (the base's "nothing unsupported"): positions beyond the trained window still run, and how
    # badly RoPE extrapolates there is what a user measures.

    @dataclass
    class Options:
        device: str = "auto"
        """auto (CUDA if present, one GPU per local rank), cpu, cuda or cuda:N."""
        dtype: str = "auto"
        """auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16."""
        chunk_size: int = 4096
        """Prefill chunk in tokens; 0 = the whole prompt at once."""
        attn_implementation: str = "auto"
        """Any transformers attention, or "evalctx_sdpa" (lower-right causal SDPA without a mask tensor: less
        memory and faster kernels for chunked prefill at long context). "auto": evalctx_sdpa on CUDA for plain
        causal architectures without sliding windows, else "sdpa"."""
        threads: int = 0
        """torch CPU threads (0 = torch's default)."""
        tp: int = 1
        """Tensor-parallel ranks per replica (only 1 is supported by this backend for now)."""

    @classmethod
    def ranks_per_replica(cls, options: Any, model: str | None) -> int:
        if options.tp != 1:
            raise UsageError("backend hf: tp > 1 is not supported yet; run replicas instead (mpirun -n GPUS, tp=1)")
        return 1

    def __init__(self, options: Any, ctx: BackendContext) -> None:
        super().__init__(options, ctx)
        require_extra("torch", "hf")
        require_extra("transformers", "hf")
        # Spinning OpenMP workers made each CPU decode step ~7x slower on a busy 2-core machine; waiting
        # passively costs nothing measurable when the cores are free. Must be set before torch first loads.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        # The run has its own progress line; transformers' per-load bars would interleave with it on stderr.
        transformers.utils.logging.disable_progress_bar()

        from evalctx.models import resolve_model

        if options.dtype not in _DTYPES:
            raise UsageError(f"backend hf: dtype must be one of {_DTYPES}, not {options.dtype!r}")
        if options.chunk_size < 0:
            raise UsageError("backend hf: chunk_size must be >= 0")
        if ctx.model is None:
            raise UsageError("backend hf needs --model (a model directory or an embedded name such as 'tiny')")
        if options.threads:
            torch.set_num_threads(options.threads)
        self.torch = torch
        self.device = self._pick_device(options.device, ctx)
        dtype = options.dtype
        if dtype == "auto":
            dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        self.dtype = getattr(torch, dtype)
        resolved = resolve_model(ctx.model)
        self.attn_implementation = options.attn_implementation
        if self.attn_implementation == "auto":
            self.attn_implementation = auto_attention(resolved, self.device.type == "cuda")
        if self.attn_implementation == LOWER_RIGHT_SDPA:
            register_lower_right_sdpa()
        self.model_name = resolved.name
        self.model_path = resolved.path
        kwargs: dict[str, Any] = {"local_files_only": True, "dtype": self.dtype,
                                  "attn_implementation": self.attn_implementation}
        if resolved.gguf_file:
            kwargs["gguf_file"] = resolved.gguf_file
        try:
            model = AutoModelForCausalLM.from_pretrained(str(resolved.path), **kwargs)
        except (OSError, ValueError) as exc:
            raise UsageError(f"backend hf: cannot load a model from {resolved.path}: {exc}".split("\n")[0]) from exc
        self.model = model.to(self.device).eval()
        # transformers renamed past_key_values to cache (5.2x); pass whichever this version's forward takes.
        import inspect

        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = getattr(ctx.tokenizer, "eos_token_id", None)
        self.eos_ids: set[int] = set(eos if isinstance(eos, list) else ([eos] if eos is not None else []))
        limit = getattr(self.model.config, "max_position_embeddings", None)
        self.max_positions: int | None = int(limit) if limit else None

    @staticmethod
    def _pick_device(spec: str, ctx: BackendContext) -> Any:
        import torch

        if spec == "auto":
            if not torch.cuda.is_available():
                return torch.device("cpu")
            local = int(os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", os.environ.get("LOCAL_RANK", ctx.world_rank)))
            return torch.device("cuda", local % torch.cuda.device_count())
        if spec.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError("backend hf: device=cuda but no CUDA device is visible; use device=cpu")
        return torch.device(spec)

    # ------------------------------------------------------------------------------------------------------
    def _sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def generate(self, batch: Sequence[GenerationRequest]) -> list[GenerationResult]:
        lengths = {len(r.prompt_ids) for r in batch}
        budgets = {r.max_new_tokens for r in batch}
        groups = [list(batch)] if len(lengths) == 1 and len(budgets) == 1 else [[r] for r in batch]
        out: list[GenerationResult] = []
        for group in groups:
            out.extend(self._generate_group(group))
        return out

    def _generate_group(self, group: list[GenerationRequest]) -> list[GenerationResult]:
        torch = self.torch
        try:
            return self._run(group)
        except torch.cuda.OutOfMemoryError as exc:  # a sample-level failure: report it, free memory, go on
            torch.cuda.empty_cache()
            msg = f"CUDA out of memory at {len(group[0].prompt_ids)} tokens x batch {len(group)}: " \
                  f"lower chunk_size or batch size ({str(exc).splitlines()[0][:160]})"
            return [GenerationResult(text=None, error=msg, n_prompt_tokens=len(r.prompt_ids), batch_size=len(group))
                    for r in group]

    def _run(self, group: list[GenerationRequest]) -> list[GenerationResult]:
        torch = self.torch
        from transformers import DynamicCache

        n = len(group[0].prompt_ids)
        bsz = len(group)
        max_new = group[0].max_new_tokens
        ids = torch.tensor([r.prompt_ids for r in group], dtype=torch.long, device=self.device)
        chunk = self.options.chunk_size or n
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            cache = DynamicCache()
            logits = None
            for start in range(0, n, chunk):
                outp = self.model(input_ids=ids[:, start:start + chunk], use_cache=True, logits_to_keep=1,
                                  **{self._cache_kw: cache})
                logits = outp.logits
            assert logits is not None
            next_tok = logits[:, -1, :].argmax(dim=-1)
            self._sync()
            ttft = time.perf_counter() - t0
            generated = [next_tok]
            done = torch.zeros(bsz, dtype=torch.bool, device=self.device)
            eos = torch.tensor(sorted(self.eos_ids), device=self.device) if self.eos_ids else None
            for _ in range(max_new - 1):
                if eos is not None:
                    done |= torch.isin(next_tok, eos)
                    if bool(done.all()):
                        break
                outp = self.model(input_ids=next_tok[:, None], use_cache=True, **{self._cache_kw: cache})
                next_tok = outp.logits[:, -1, :].argmax(dim=-1)
                generated.append(next_tok)
            self._sync()
            latency = time.perf_counter() - t0
        tokens = torch.stack(generated, dim=1).tolist()
        peak = int(torch.cuda.max_memory_allocated(self.device)) if self.device.type == "cuda" else None
        results = []
        for row in tokens:
            cut = next((i for i, t in enumerate(row) if t in self.eos_ids), None)
            kept = row if cut is None else row[:cut]
            results.append(GenerationResult(
                text=self.ctx.tokenizer.decode(kept), n_prompt_tokens=n, n_output_tokens=len(kept),
                latency_s=latency, ttft_s=ttft, batch_size=bsz,
                finish_reason="stop" if cut is not None else "length", peak_memory_bytes=peak,
            ))
        return results

    # ------------------------------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        cfg = self.model.config
        d = super().info()
        d.update({
            "model": self.model_name,
            "model_path": str(self.model_path),
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "attn_implementation": self.attn_implementation,
            "model_config": {k: getattr(cfg, k, None) for k in (
                "architectures", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "vocab_size", "max_position_embeddings", "rope_theta", "rope_scaling")},
            "n_parameters": sum(p.numel() for p in self.model.parameters()),
            "torch": self.torch.__version__,
            "gpu": self.torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None,
        })
        return d

    def row_columns(self) -> dict[str, Any]:
        return {"backend": self.name, "model": self.model_name, "hf_dtype": str(self.dtype).replace("torch.", ""),
                "hf_device": self.device.type, "hf_chunk_size": self.options.chunk_size,
                "hf_attn_implementation": self.attn_implementation}
