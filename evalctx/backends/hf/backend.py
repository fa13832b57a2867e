"""Hugging Face transformers backend: greedy decoding with chunked prefill into a preallocated KV cache, on CPU or
CUDA, one GPU or ``tp`` GPUs per replica, offline.

Chunked prefill keeps activation memory bounded at long context: the prompt goes through the model ``chunk_size``
tokens at a time into a KV cache allocated once for prompt plus budget (:mod:`.cache`), computing logits for the
last position only; attention of each chunk against all keys so far runs on the flash kernel (:mod:`.attention`).
With ``tp > 1`` each replica is ``tp`` MPI ranks sharing one torch.distributed group and transformers' own tensor
parallel plan (:mod:`.parallel`); every rank runs the same batch, the leader's results are kept.
Before loading, the weights must fit; before any generation, each sample's weights + KV cache + activations must
fit the GPU (:mod:`evalctx.capacity.memory`), else the sample is an ``unsupported`` row that says by how much.
TTFT is the prefill time through the first generated token; latency covers decode too.

With ``prefix_reuse`` the cache outlives a request: the next prompt keeps the positions it shares with the
previous one (their common prefix of token ids, rounded down to whole chunks) and computes the rest. The runner
orders each length's prompts so consecutive ones share the most (:mod:`evalctx.run.prefix_order`): an 11-depth sweep
then computes about 0.6x the prompt tokens. Every position is still computed in the same chunk, against the same
keys, as in a cold prefill, so answers equal a run without reuse; a warm row's TTFT is the prefill of its suffix
alone, and the row says so with ``n_cached_prompt_tokens`` > 0.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

from evalctx.backends.base import Backend, BackendContext, common_prefix
from evalctx.backends.hf.attention import (LOWER_RIGHT_SDPA, auto_attention, cuda_kernels, plain_causal,
                                           register_lower_right_sdpa)
from evalctx.backends.hf.greedy import GreedyRules, GreedyStepper, decode, describe, end_ids
from evalctx.backends.hf.memory_check import MemoryCheck
from evalctx.backends.hf.rope import PromptRope
from evalctx.backends.hf.support import check_engine_matches_forward, check_supported
from evalctx.capacity.dtypes import torch_dtype_name
from evalctx.models.model_facts import SHAPE_FIELDS, rope_facts
from evalctx.capacity.preflight import EngineLimits, SampleLike, limits_from_hf_config, preflight
from evalctx.errors import UsageError, require_extra
from evalctx.models.tokenizer_check import check_tokenizer, own_tokenizer
from evalctx.records import GenerationRequest, GenerationResult

_DTYPES = {"auto": None, "float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def _kv_format(spec: str, scale: str, model_dtype: str) -> str | None:
    """The KV cache format from the kv_dtype and kv_scale options: None for the model dtype (``model_dtype``, the
    short name, may be named too), "fp8"/"int8" (scale per token and KV head) or "fp8_tensor" (fp8, one unit scale
    per tensor); UsageError naming what to pass otherwise."""
    from evalctx.capacity.dtypes import canonical_dtype

    key = spec.strip().lower().replace("-", "_")
    if key in ("auto", "model", ""):
        named: str | None = None
    else:
        try:
            named = {"e4m3": "fp8", "fp8_e4m3": "fp8", "float8_e4m3fn": "fp8"}.get(key) or canonical_dtype(key)
        except UsageError:
            named = key
        if named == model_dtype:
            named = None
        elif named not in ("fp8", "int8"):
            raise UsageError(f"backend hf: kv_dtype={spec!r} is not one of auto (the model dtype, {model_dtype}), "
                             "fp8 (e4m3), int8")
    if scale not in ("token", "tensor"):
        raise UsageError(f"backend hf: kv_scale={scale!r} is not one of token (a scale per token and KV head), "
                         "tensor (fp8 with one unit scale per tensor)")
    if scale == "tensor":
        if named != "fp8":
            raise UsageError("backend hf: kv_scale=tensor is fp8's uncalibrated per-tensor scale: pass it with "
                             "kv_dtype=fp8 (int8 needs a calibrated scale per tensor, which evalctx does not have)")
        return "fp8_tensor"
    return named


class HFBackend(Backend):
    name: ClassVar[str] = "hf"

    @dataclass
    class Options:
        device: str = "auto"
        """auto (CUDA if present, one GPU per local rank), cpu, cuda or cuda:N."""
        dtype: str = "auto"
        """auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16 (any spelling: fp16, half, bf16)."""
        chunk_size: int = 4096
        """Prefill chunk in tokens; 0 = the whole prompt at once."""
        attn_implementation: str = "auto"
        """Any transformers attention, or "evalctx_sdpa" (lower-right causal SDPA without a mask tensor: less
        memory and faster kernels for chunked prefill at long context; plain causal models only). "auto":
        evalctx_sdpa on CUDA for plain causal architectures without sliding windows, else what transformers picks
        for the model (sdpa, or eager for soft-capping and sinks)."""
        threads: int = 0
        """torch CPU threads (0 = torch's default)."""
        tp: int = 1
        """Tensor-parallel ranks per replica (transformers' tp plan over one torch.distributed group per replica:
        NCCL on CUDA, gloo on CPU). ``mpirun -n 4 ... tp=2`` is two replicas of two ranks."""
        memory_gb: float = 0.0
        """Memory per device (10^9 bytes) the memory preflight plans for; 0 = the CUDA device's total memory
        (no memory check on CPU)."""
        ignore_eos: bool = False
        """Decode all max_new_tokens even past an end-of-sequence token (for timing runs; the answer is still cut
        at the first one)."""
        prefix_reuse: bool = False
        """Keep the previous prompt's KV cache and compute only the positions after its common prefix with the
        next prompt (token ids compared, rounded down to whole chunks so the logits equal a cold prefill's). Off by
        default: a warm row's TTFT is not a cold prefill (its n_cached_prompt_tokens says how much was reused, and
        latency tables leave such rows out). Needs chunk_size > 0."""
        kv_dtype: str = "auto"
        """KV cache precision: auto (the model dtype), fp8 (e4m3) or int8 (evalctx.capacity.kv_layout): to measure what a
        quantized KV cache costs in accuracy (compare the run with one at auto)."""
        kv_scale: str = "token"
        """Scales of a quantized KV cache: token (one float32 scale per token and KV head, finer than the serving
        engines' schemes) or tensor (fp8 only: one unit scale per tensor, as vLLM without calibrated scales)."""
        window_kv: bool = True
        """Sliding-window and chunked-attention layers keep only the positions their window needs (Gemma 2/3,
        gpt-oss, Mistral, Llama 4; evalctx.capacity.kv_layout); false keeps every position in every layer."""
        generation_config: str = "model"
        """How the model's generation_config.json shapes greedy decoding: "model" applies what
        ``generate(do_sample=False)`` applies (repetition_penalty) and refuses, naming it, a field evalctx cannot
        apply (beam search, n-gram bans, forced tokens); "none" decodes by plain argmax. Either way an answer ends
        on the generation config's and the tokenizer's end ids."""

    @classmethod
    def ranks_per_replica(cls, options: Any, model: str | None) -> int:
        if options.tp < 1:
            raise UsageError(f"backend hf: tp must be >= 1, got {options.tp}")
        return int(options.tp)

    def __init__(self, options: Any, ctx: BackendContext) -> None:
        super().__init__(options, ctx)
        require_extra("torch", "hf")
        require_extra("transformers", "hf")
        # Spinning OpenMP workers made each CPU decode step ~7x slower on a busy 2-core machine; waiting
        # passively costs nothing measurable when the cores are free. Must be set before torch first loads.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        import torch
        import transformers

        # The run has its own progress line; transformers' per-load bars would interleave with it on stderr.
        transformers.utils.logging.disable_progress_bar()

        from evalctx.models.embedded import resolve_model

        dtype = options.dtype if options.dtype == "auto" else torch_dtype_name(options.dtype, "backend hf dtype")
        if options.chunk_size < 0:
            raise UsageError("backend hf: chunk_size must be >= 0")
        if options.memory_gb < 0:
            raise UsageError("backend hf: memory_gb must be >= 0 (0 = the device's own memory)")
        if options.prefix_reuse and options.chunk_size == 0:
            raise UsageError("backend hf: prefix_reuse reuses whole prefill chunks: set chunk_size > 0 "
                             "(e.g. chunk_size=4096)")
        if ctx.model is None:
            raise UsageError("backend hf needs --model (a model directory or an embedded name such as 'tiny')")
        if options.threads:
            torch.set_num_threads(options.threads)
        self.torch = torch
        self.tp = int(options.tp)
        self.device = self._pick_device(options.device, ctx)
        if self.tp > 1 and self.device.type == "cpu" and torch.cuda.is_available():
            raise UsageError("backend hf: tp > 1 uses the GPUs on a machine that has them; drop device=cpu")
        if dtype == "auto":
            dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        self.dtype = getattr(torch, dtype)
        self.short_dtype = _DTYPES[dtype]
        self.kv_dtype = _kv_format(options.kv_dtype, options.kv_scale, self.short_dtype)
        resolved = resolve_model(ctx.model)
        self.model_name = resolved.name
        self.model_path = resolved.path
        self.config = self._load_config(resolved)
        self.attn_implementation = options.attn_implementation
        if self.attn_implementation == "auto":
            self.attn_implementation = auto_attention(self.config, self.device.type == "cuda")
        if self.attn_implementation == LOWER_RIGHT_SDPA:
            if self.config is not None and not plain_causal(self.config):
                # It builds no mask: sliding, chunked or soft-capped attention would be computed as plain causal.
                raise UsageError(f"backend hf: attn_implementation={LOWER_RIGHT_SDPA} computes plain causal "
                                 f"attention, and {self.model_name} ({getattr(self.config, 'model_type', '?')}) is "
                                 "not a plain causal model (sliding or chunked layers, soft-capping, sinks, or a "
                                 "family evalctx has not verified it on): use attn_implementation=auto")
            register_lower_right_sdpa()
        from evalctx.backends.hf.cache import model_windows  # imports transformers: after the extra's check

        self.kv_windows = model_windows(self.config) if self.config is not None and options.window_kv else None
        self.memcheck = MemoryCheck(self.config, str(self.model_path), device=self.device,
                                    memory_gb=options.memory_gb, chunk_size=options.chunk_size, tp=self.tp,
                                    dtype=self.short_dtype, attention=self.attn_implementation,
                                    announce=ctx.world_rank == 0, kv_dtype=self.kv_dtype or self.short_dtype,
                                    windows=self.kv_windows,
                                    reuse_every=options.chunk_size if options.prefix_reuse else 0)
        self.memcheck.check_weights_fit()
        if self.tp > 1:
            from evalctx.backends.hf.parallel import check_divides, init_replica_group

            if self.config is not None:
                check_divides(self.config, self.tp)
            init_replica_group(ctx.replica_comm, ctx.rank_in_replica, self.tp, self.device)
        if self.config is not None:
            check_supported(self.config, self.model_name)
        self.model = self._load_model(resolved)
        # transformers renamed past_key_values to cache (5.2x); pass whichever this version's forward takes.
        import inspect

        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.rope = PromptRope(self.model)
        gen_config = getattr(self.model, "generation_config", None)
        self.eos_ids: set[int] = end_ids(gen_config, ctx.tokenizer)
        self.greedy = GreedyRules.from_model(gen_config, self.model_name, options.generation_config)
        limits = self.limits()
        self.max_positions: int | None = limits.max_positions or limits.trained_positions
        self._cache: Any = None
        self.last_prefill_logits: Any = None
        """The last batch's first-token logits (batch, vocab), for conformance checks."""
        self._cached_prompts: list[list[int]] | None = None
        """With prefix_reuse: the prompts whose keys and values fill the cache's first positions, one per row."""
        self.check_tokenizer(resolved)
        self.forward_check = check_engine_matches_forward(self)

    @staticmethod
    def _pick_device(spec: str, ctx: BackendContext) -> Any:
        import torch

        from evalctx.backends.hf.parallel import local_rank

        if spec == "auto":
            if not torch.cuda.is_available():
                return torch.device("cpu")
            return torch.device("cuda", local_rank() % torch.cuda.device_count())
        if spec.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError("backend hf: device=cuda but no CUDA device is visible; use device=cpu")
        device = torch.device(spec)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank() % torch.cuda.device_count())
        return device

    def _load_config(self, resolved: Any) -> Any:
        """The model's transformers config, or None when it cannot be read (the model load reports why)."""
        from transformers import AutoConfig

        kw: dict[str, Any] = {"local_files_only": True}
        if resolved.gguf_file:
            kw["gguf_file"] = resolved.gguf_file
        try:
            return AutoConfig.from_pretrained(str(resolved.path), **kw)
        except (OSError, ValueError):
            return None

    def _load_model(self, resolved: Any) -> Any:
        from transformers import AutoModelForCausalLM

        kwargs: dict[str, Any] = {"local_files_only": True, "dtype": self.dtype,
                                  "attn_implementation": self.attn_implementation}
        if resolved.gguf_file:
            kwargs["gguf_file"] = resolved.gguf_file
        if self.tp > 1:
            from evalctx.backends.hf.parallel import tp_load_kwargs

            kwargs.update(tp_load_kwargs(self.tp))
        elif self.device.type == "cuda":
            kwargs["device_map"] = str(self.device)  # straight to the GPU, not through host memory
        try:
            model = AutoModelForCausalLM.from_pretrained(str(resolved.path), **kwargs)
        except (OSError, ValueError, ImportError) as exc:  # ImportError: an attention whose package is missing
            raise UsageError(f"backend hf: cannot load a model from {resolved.path}: {exc}".split("\n")[0]) from exc
        return (model if self.tp > 1 else model.to(self.device)).eval()

    def check_tokenizer(self, resolved: Any) -> None:
        """The tokenizer that builds the prompts must be this model's (evalctx.models.tokenizer_check): UsageError."""
        own = own_tokenizer(resolved.path, resolved.gguf_file, self.ctx.tokenizer)
        rows = self.model.get_input_embeddings().num_embeddings
        check_tokenizer(self.ctx.tokenizer, resolved.name, rows, own, own_spec=self.ctx.model)

    def limits(self) -> EngineLimits:
        """What the model's config lets it see: a sliding window in every layer or learned absolute positions make
        longer prompts unsupported; RoPE positions beyond max_position_embeddings run, flagged."""
        return limits_from_hf_config(self.model.config.to_dict())

    def preflight(self, samples: Sequence[SampleLike]) -> dict[str, str]:
        """Samples the model cannot see whole (:meth:`limits`), then samples whose weights + KV cache (prompt +
        budget) + activations do not fit one GPU of the replica (:class:`.memory_check.MemoryCheck`)."""
        out = preflight(samples, self.limits())
        if not self.memcheck.on:
            return out
        reasons: dict[tuple[int, int], str | None] = {}
        for s in samples:
            if s.id in out:
                continue
            key = (s.context_length, s.max_new_tokens)
            if key not in reasons:
                reasons[key] = self.memcheck.reason(*key)
            if reasons[key] is not None:
                out[s.id] = reasons[key]
        return out

    # --- generation --------------------------------------------------------------------------------------------
    def _sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def generate(self, batch: Sequence[GenerationRequest]) -> list[GenerationResult]:
        lengths = {len(r.prompt_ids) for r in batch}
        budgets = {r.max_new_tokens for r in batch}
        groups = [list(batch)] if len(lengths) == 1 and len(budgets) == 1 else [[r] for r in batch]
        out: list[GenerationResult] = []
        for group in groups:
            size = self.memcheck.max_batch(len(group[0].prompt_ids) + group[0].max_new_tokens, len(group))
            for i in range(0, len(group), size):
                out.extend(self._generate_group(group[i:i + size]))
        return out

    def _generate_group(self, group: list[GenerationRequest]) -> list[GenerationResult]:
        torch = self.torch
        try:
            return self._run(group)
        except torch.cuda.OutOfMemoryError as exc:
            self._cache = self._cached_prompts = None
            msg = f"CUDA out of memory at {len(group[0].prompt_ids)} tokens x batch {len(group)}: " \
                  f"lower chunk_size or batch size ({str(exc).splitlines()[0][:160]})"
            if self.tp > 1:  # the other ranks wait in a collective this rank will never join: end the job
                raise RuntimeError(msg) from exc
            torch.cuda.empty_cache()  # a sample-level failure: report it, free memory, go on
            return [GenerationResult(text=None, error=msg, n_prompt_tokens=len(r.prompt_ids), batch_size=len(group))
                    for r in group]

    def _cache_for(self, prompts: list[list[int]], capacity: int) -> tuple[Any, int]:
        """A KV cache for ``prompts`` (one per row) of ``capacity`` positions each, and how many of their first
        positions it already holds (:meth:`_reusable`; 0 without prefix_reuse). The last cache is reused when it
        has the same batch and room: kept in part for a shared prefix, else emptied if it is not far larger (a
        peak-memory reading should describe this sample)."""
        old = self._cache
        if old is not None and old.batch == len(prompts) and old.capacity >= capacity:
            keep = self._reusable(prompts)
            while keep and not old.keeps(keep):  # a window layer holds the positions before whole chunks only
                keep -= self.options.chunk_size
            if keep or old.capacity <= capacity * 5 // 4:
                old.crop_to(keep)
                return old, keep
        self._cache = self._cached_prompts = None  # release the old buffers before the new ones are allocated
        del old
        self._cache = self.new_cache(capacity, len(prompts))
        return self._cache, 0

    def new_cache(self, capacity: int, batch: int, *, quantized: bool = True, step: int | None = None) -> Any:
        """An empty KV cache as this backend lays it out (windows, precision, reuse snapshots) for ``batch``
        sequences of ``capacity`` positions. ``quantized=False`` keeps the model dtype whatever the kv_dtype option
        says; ``step``: the longest query (default: the chunk_size option)."""
        from evalctx.backends.hf.cache import PreallocatedCache

        windows = self.kv_windows or self.model.config.num_hidden_layers
        chunk = self.options.chunk_size
        return PreallocatedCache(windows, capacity, batch, step=chunk if step is None else step,
                                 reuse_every=chunk if self.options.prefix_reuse else 0,
                                 kv_dtype=self.kv_dtype if quantized else None)

    def _reusable(self, prompts: list[list[int]]) -> int:
        """Leading positions of ``prompts`` whose keys and values the cache holds: the shortest common prefix of
        each row's cached and new prompt, short of the last prompt token (its logits give the first answer token),
        rounded down to a whole number of chunks so that every computed position sits in the same chunk as in a
        cold prefill (same shapes, same keys: the same logits)."""
        cached = self._cached_prompts
        if not self.options.prefix_reuse or cached is None or len(cached) != len(prompts):
            return 0
        shared = min(min(common_prefix(a, b) for a, b in zip(cached, prompts)), len(prompts[0]) - 1)
        chunk = self.options.chunk_size
        keep = shared // chunk * chunk
        # RoPE whose frequencies follow the prompt's length (dynamic NTK, LongRoPE) rotated the cached keys for
        # the cached prompt's length: reusable only where this prompt's length rotates them alike.
        return keep if self.rope.same_rotation(len(cached[0]), len(prompts[0]), keep) else 0

    def prefill(self, ids: Any, cache: Any, start: int = 0, chunk: int | None = None) -> Any:
        """Prefill prompt positions ``start..`` of ``ids`` (batch, n) into ``cache`` (which holds the first
        ``start``), ``chunk`` tokens at a time (default: the chunk_size option; 0 = all at once), every chunk
        rotated as in one forward over the whole prompt (:mod:`.rope`); returns the logits of the last position,
        (batch, vocab)."""
        n = ids.shape[1]
        chunk = (self.options.chunk_size if chunk is None else chunk) or n
        logits = None
        self.rope.start_prompt(n)
        cache.recording(True)
        try:
            for pos in range(start, n, chunk):
                outp = self.model(input_ids=ids[:, pos:pos + chunk], use_cache=True, logits_to_keep=1,
                                  **{self._cache_kw: cache})
                logits = outp.logits
        finally:
            self.rope.end_prompt()
            cache.recording(False)
        assert logits is not None
        return logits[:, -1, :]

    def _run(self, group: list[GenerationRequest]) -> list[GenerationResult]:
        torch = self.torch
        n = len(group[0].prompt_ids)
        bsz = len(group)
        max_new = group[0].max_new_tokens
        ids = torch.tensor([r.prompt_ids for r in group], dtype=torch.long, device=self.device)
        prompts = [r.prompt_ids for r in group]
        cache, reused = self._cache_for(prompts, n + max_new)
        self._cached_prompts = None  # the cache holds these prompts only once their prefill has finished
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            stepper = GreedyStepper(self.greedy, ids)
            self.last_prefill_logits = self.prefill(ids, cache, reused)
            next_tok = stepper.next_tokens(self.last_prefill_logits)
            self._sync()
            ttft = time.perf_counter() - t0
            generated = self._decode(cache, stepper, next_tok, max_new)
            self._sync()
            latency = time.perf_counter() - t0
        if self.options.prefix_reuse:
            self._cached_prompts = prompts
        tokens = torch.stack(generated, dim=1).tolist()
        peak = int(torch.cuda.max_memory_allocated(self.device)) if self.device.type == "cuda" else None
        results = []
        for row in tokens:
            cut = next((i for i, t in enumerate(row) if t in self.eos_ids), None)
            kept = row if cut is None else row[:cut]
            results.append(GenerationResult(
                # n_output_tokens leaves out the EOS that stopped the answer, as every backend does (records.py).
                text=self.ctx.tokenizer.decode(kept), output_ids=kept, n_prompt_tokens=n, n_output_tokens=len(kept),
                latency_s=latency, ttft_s=ttft, batch_size=bsz,
                finish_reason="stop" if cut is not None else "length", peak_memory_bytes=peak,
                n_cached_prompt_tokens=reused,
            ))
        return results

    def _decode(self, cache: Any, stepper: GreedyStepper, next_tok: Any, max_new: int) -> list[Any]:
        """Greedy decode after the prefill's token (:func:`.greedy.decode`)."""
        ends = set() if self.options.ignore_eos else self.eos_ids
        return decode(lambda ids: self.model(input_ids=ids, use_cache=True, logits_to_keep=1,
                                             **{self._cache_kw: cache}).logits[:, -1, :],
                      stepper, next_tok, max_new, ends)

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
            "attention_kernels": cuda_kernels() if self.attn_implementation == LOWER_RIGHT_SDPA else None,
            "tp": self.tp,
            "prefix_reuse": self.options.prefix_reuse,
            "kv_dtype": self.kv_dtype or self.short_dtype,
            "kv_layout": self.memcheck.layout_text((self.ctx.max_input_len or 0) + (self.ctx.max_new_tokens or 0)
                                                   or None),
            "decoding": describe(self.greedy),
            "end_ids": sorted(self.eos_ids),
            "forward_check": self.forward_check,
            # The rope facts from to_dict(): under transformers 5 they sit in rope_parameters.
            "model_config": {**{k: getattr(cfg, k, None) for k in SHAPE_FIELDS}, **rope_facts(cfg.to_dict())},
            "n_parameters": sum(p.numel() for p in self.model.parameters()),
            "memory_preflight": self.memcheck.describe(),
            "torch": self.torch.__version__,
            "gpu": self.torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None,
        })
        return d

    def row_columns(self) -> dict[str, Any]:
        return {"backend": self.name, "model": self.model_name, "hf_dtype": str(self.dtype).replace("torch.", ""),
                "hf_device": self.device.type, "hf_chunk_size": self.options.chunk_size,
                "hf_attn_implementation": self.attn_implementation, "hf_tp": self.tp,
                "hf_prefix_reuse": self.options.prefix_reuse, "hf_kv_dtype": self.kv_dtype or self.short_dtype}

    def close(self) -> None:
        self._cache = self._cached_prompts = None
        if self.tp > 1:
            from evalctx.backends.hf.parallel import close_replica_group

            close_replica_group()
