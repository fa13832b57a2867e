"""TensorRT-LLM backend ``trtllm-llm``: a Hugging Face checkpoint on the PyTorch backend (``tensorrt_llm.LLM``).

TensorRT-LLM now points new projects here rather than at prebuilt engines (its docs mark the engine-build
workflow legacy). Same rows, preflight and timing as ``trtllm``: requests go in as token ids, the answer is
``outputs[0].token_ids`` (generated only), timings are the executor's ``request_perf_metrics``
(``SamplingParams(return_perf_metrics=True)``), each request is awaited on its own so one error or one stuck request
ends only its own row: ``RequestOutput.result()`` runs in a helper thread, because the newest
``tensorrt_llm/executor/result.py`` ignores ``result(timeout)``'s timeout (``_result_step`` calls ``queue.get()``
without it), and a request still running at the deadline is ``abort()``-ed. The PyTorch backend has no fail-fast
and shrinks the attention window to the KV cache it got, so samples are held to the capacity read back after load
(:mod:`evalctx.backends.trtllm.kv_capacity`; for models with several attention window sizes, the pool of the
largest window, read from the per-window stats, since ``maxNumBlocks`` sums the pools).

Launch: evalctx runs in one process. With tensor_parallel_size > 1 on one node, plain ``evalctx run`` lets the LLM
spawn its MPI workers itself (mpi4py's MPIPoolExecutor; needs mpi4py); under mpirun or Slurm use
``mpirun -n TP trtllm-llmapi-launch evalctx run ...`` (``run_eval.sh --llmapi-launch``), which runs evalctx once
on rank 0 with the MPI variables removed while the other ranks serve as workers.
Sources: tensorrt_llm/llmapi/llm.py (commit 4c05a748 and a later indexed version: generate/generate_async,
_check_arguments, get_stats), llm_args.py (TorchLlmArgs, KvCacheConfig; the newest declares fail-fast on TrtLlmArgs
only), executor/result.py, _torch/pyexecutor/resource_manager.py (adjust_window_sizes_for_vswa,
calculate_max_num_blocks_for_vswa), _torch/pyexecutor/kv_cache_stats.py (kvCacheIterationStats, commit a1510015),
py_executor.py and llm.py (get_kv_cache_capacity, newest indexed), executor jsonSerialization.cpp (KvCacheStats keys).
Never run on a real GPU here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from evalctx.backends.base import Backend, BackendContext
from evalctx.backends.trtllm.backend import SharedOptions, deadline_summary
from evalctx.backends.trtllm.executor import WINDOW_ADVICE
from evalctx.backends.trtllm.kv_capacity import KVCapacityGuard
from evalctx.backends.trtllm import waiting
from evalctx.backends.trtllm.outputs import (default_end_ids, default_pad_id, engine_timing, error_result,
                                             host_timing, is_fatal, one_line, run_checked, to_result)
from evalctx.errors import UsageError, require_extra
from evalctx.capacity.kv_layout import layer_windows
from evalctx.capacity.preflight import EngineLimits, SampleLike, check, limits_from_hf_config, preflight
from evalctx.records import GenerationRequest, GenerationResult

log = logging.getLogger("evalctx.backends.trtllm")

# Without these the run would be wrong rather than slower, so a release without them is refused.
REQUIRED_ARGS = ("model", "kv_cache_config", "enable_chunked_prefill", "max_seq_len", "max_num_tokens",
                 "return_perf_metrics")
GUARDED_ARGS = ("fail_fast_on_attention_window_too_large", "enable_iter_perf_stats")
"""Keywords dropped without a warning where a release lacks them (still listed in ``dropped``): the newest
TorchLlmArgs has no fail-fast (a TrtLlmArgs field), and evalctx guards the KV cache by its capacity either way
(:meth:`TRTLLMAPIBackend._resolve_kv_capacity`, which refuses the run where it can read no capacity)."""
_ABANDONED: list[Any] = []


class TRTLLMAPIBackend(KVCapacityGuard, Backend):
    name = "trtllm-llm"

    @dataclass
    class Options(SharedOptions):
        model_dir: str | None = None
        """Hugging Face checkpoint directory; default: --model."""
        tensor_parallel_size: int = 1
        pipeline_parallel_size: int = 1
        max_seq_len: int | None = None
        """Default: the run's longest prompt plus its largest max_new_tokens."""
        max_num_tokens: int = 8192
        """Tokens per engine step (the prefill chunk with chunked prefill); the LLM API's default."""
        enable_chunked_prefill: bool = True
        """Off: a prompt longer than max_num_tokens is refused (llm.py _check_arguments)."""
        kv_cache_dtype: str = "auto"
        tokens_per_block: int = 32
        """KvCacheConfig.tokens_per_block (the PyTorch backend's default)."""
        extra_llm_args: dict[str, Any] | None = None
        """Further ``LLM(...)`` keywords, as a ``[backend_options.extra_llm_args]`` table in the suite."""

    def __init__(self, options: Options, ctx: BackendContext) -> None:
        super().__init__(options, ctx)
        if ctx.world_size > 1:
            raise UsageError("backend trtllm-llm runs in one evalctx process: for tensor_parallel_size > 1 use plain "
                             "`evalctx run` on one node, or `mpirun -n TP trtllm-llmapi-launch evalctx run ...` "
                             "(run_eval.sh --llmapi-launch)")
        self.model_dir = options.model_dir or ctx.model
        if not self.model_dir:
            raise UsageError("backend trtllm-llm needs a checkpoint: --model HF_DIR or --backend-opt model_dir=DIR")
        self.tokenizer = ctx.tokenizer
        self.checkpoint_config = _hf_config(self.model_dir)
        self.model_limits = limits_from_hf_config(self.checkpoint_config or {})
        self._check_tokenizer(ctx.model)
        self.end_ids = list(options.end_ids or default_end_ids(self.tokenizer, self.model_dir))
        if not self.end_ids:
            raise UsageError("no end-of-answer token is known: pass --backend-opt end_ids=ID[,ID]")
        self.pad_id = options.pad_id if options.pad_id is not None else default_pad_id(self.tokenizer, self.end_ids)
        wanted = (ctx.max_input_len or 0) + (ctx.max_new_tokens or 0)
        self.llm_args: dict[str, Any] = {}
        self.dropped: list[str] = []
        self.deadlines_s: list[float] = []
        """The deadline each batch was given (request_timeout_s, or the rule scaled with its prompt tokens)."""
        self.version: str | None = None
        windows = layer_windows(self.checkpoint_config) if self.checkpoint_config else None
        self.window_sizes = sorted({w for w in windows}, key=lambda w: (w is None, w or 0)) if windows else []
        """The checkpoint's attention window sizes (None: full attention); several = VSWA in TensorRT-LLM."""
        self._llm: Any = None
        self._failed = False
        self._load(options.max_seq_len or wanted or None)
        args = getattr(self._llm, "args", None)
        # What the LLM settled on (it may derive max_seq_len from the checkpoint when none was given).
        self.max_seq_len = getattr(args, "max_seq_len", None) or self.llm_args.get("max_seq_len")
        self.max_num_tokens = getattr(args, "max_num_tokens", None) or options.max_num_tokens
        self.kv_capacity: int | None = None
        self.kv_capacity_source: str | None = None
        self.kv_blocks: tuple[int, int] | None = None
        self.kv_window: int | None = None
        """Under VSWA, the (largest) attention window whose pool bounds one sequence, as TensorRT-LLM keys it."""
        self._resolve_kv_capacity()

    def _check_tokenizer(self, spec: str | None) -> None:
        """Before the LLM loads: the tokenizer must be the checkpoint's (evalctx.models.tokenizer_check), as for hf."""
        from evalctx.models.tokenizer_check import check_tokenizer, own_tokenizer

        if self.tokenizer is None or self.checkpoint_config is None:
            return
        rows = self.checkpoint_config.get("vocab_size")
        own = own_tokenizer(Path(self.model_dir), None, self.tokenizer)
        check_tokenizer(self.tokenizer, str(self.model_dir), rows if isinstance(rows, int) else None, own,
                        own_spec=spec or str(self.model_dir))

    def _load(self, max_seq_len: int | None) -> None:
        require_extra("tensorrt_llm", "trtllm")
        try:
            import tensorrt_llm
            from tensorrt_llm import LLM, SamplingParams
            from tensorrt_llm.llmapi import KvCacheConfig
        except ImportError as exc:
            raise UsageError(f"tensorrt_llm's LLM API cannot be imported ({exc}): "
                             "pip install 'evalctx[trtllm]'") from None
        self.version = str(getattr(tensorrt_llm, "__version__", "unknown"))
        o = self.options
        kv_kw = dict(free_gpu_memory_fraction=o.kv_cache_free_gpu_memory_fraction,
                     enable_block_reuse=o.kv_cache_enable_block_reuse, max_tokens=o.max_tokens_in_paged_kv_cache,
                     sink_token_length=o.sink_token_length,
                     max_attention_window=[o.max_attention_window_size] if o.max_attention_window_size else None,
                     dtype=o.kv_cache_dtype, tokens_per_block=o.tokens_per_block)
        try:
            kv = KvCacheConfig(**{k: v for k, v in kv_kw.items() if v is not None})
        except (TypeError, ValueError) as exc:
            raise UsageError(f"tensorrt_llm {self.version}: KvCacheConfig refused the cache settings: "
                             f"{one_line(exc)}") from None
        wanted: dict[str, Any] = dict(
            model=str(self.model_dir), tensor_parallel_size=o.tensor_parallel_size,
            pipeline_parallel_size=o.pipeline_parallel_size, kv_cache_config=kv,
            enable_chunked_prefill=o.enable_chunked_prefill, max_seq_len=max_seq_len, max_num_tokens=o.max_num_tokens,
            max_batch_size=o.max_batch_size, return_perf_metrics=True,
            fail_fast_on_attention_window_too_large=o.fail_fast_on_attention_window_too_large,
            enable_iter_perf_stats=True, **(o.extra_llm_args or {}))
        self.llm_args = self._known_args({k: v for k, v in wanted.items() if v is not None})
        try:
            self._llm = LLM(**self.llm_args)
        except (TypeError, ValueError, RuntimeError) as exc:  # pydantic's ValidationError is a ValueError; the
            # executor's own refusals at load (KV cache too small for the window, out of memory) are RuntimeErrors
            advice = f"; {WINDOW_ADVICE}" if "attention window" in str(exc).lower() else ""
            raise UsageError(f"tensorrt_llm {self.version}: LLM(...) refused the settings: {one_line(exc)}"
                             f"{advice}") from None
        fields = getattr(SamplingParams, "__dataclass_fields__", None)
        self._sp_fields = set(fields) if fields else None
        self._sampling_cls = SamplingParams

    def _known_args(self, wanted: dict[str, Any]) -> dict[str, Any]:
        """Drop (and report) LLM keywords this release does not know; refuse when a required one is missing."""
        try:
            from tensorrt_llm.llmapi.llm_args import TorchLlmArgs

            known = set(TorchLlmArgs.model_fields)
        except (ImportError, AttributeError):
            return wanted  # no field list to check against: LLM(...) itself refuses unknown keywords
        missing = [k for k in wanted if k not in known]
        refused = sorted(set(missing) & set(REQUIRED_ARGS))
        if refused:
            raise UsageError(f"tensorrt_llm {self.version}: LLM has no {', '.join(refused)}, which evalctx needs for "
                             "correct results: install tensorrt_llm >= 1.2 (pip install 'evalctx[trtllm]')")
        if missing:
            self.dropped = [f"LLM.{k}" for k in missing]
            loud = [k for k in missing if k not in GUARDED_ARGS]
            if loud:
                log.warning("tensorrt_llm %s: LLM has no %s; dropped (library defaults apply)", self.version,
                            ", ".join(loud))
        return {k: v for k, v in wanted.items() if k in known}

    def _seq_reason(self, prompt_tokens: int, max_new_tokens: int) -> str | None:
        """Why a sample does not fit the LLM's max_seq_len, with this backend's fix (there is no engine to
        rebuild: max_seq_len is an LLM argument); None when it fits or max_seq_len is unknown."""
        need = prompt_tokens + max_new_tokens
        if not self.max_seq_len or need <= self.max_seq_len:
            return None
        stated = self.model_limits.max_positions or self.model_limits.trained_positions
        within = f" (the checkpoint states {stated} positions)" if stated else ""
        return (f"prompt {prompt_tokens} + max_new_tokens {max_new_tokens} = {need} tokens but the LLM was loaded with "
                f"max_seq_len {self.max_seq_len}: pass --backend-opt max_seq_len={need} or more{within}, or leave "
                f"max_seq_len unset (the run's longest prompt plus its answer budget), or drop lengths > "
                f"{max(0, self.max_seq_len - max_new_tokens)}")

    # --------------------------------------------------------------------------------------------- preflight
    def limits(self) -> EngineLimits:
        o = self.options
        seq = self.max_seq_len
        window = min(o.max_attention_window_size or seq, seq) if seq else o.max_attention_window_size
        # What the checkpoint's config.json states as well: a sliding window in every layer, learned absolute
        # positions (unsupported beyond), a RoPE model's stated window (rows beyond it flagged).
        m = self.model_limits
        if m.attention_window:
            window = min(window, m.attention_window) if window else m.attention_window
        return EngineLimits(max_seq_len=seq, max_num_tokens=self.max_num_tokens, paged_context_fmha=True,
                            chunked_context=o.enable_chunked_prefill, kv_cache_tokens=self.kv_capacity,
                            tokens_per_block=self.kv_blocks[1] if self.kv_blocks else o.tokens_per_block,
                            attention_window=window,
                            sink_tokens=o.sink_token_length or 0, max_positions=m.max_positions,
                            trained_positions=m.trained_positions)

    def preflight(self, samples: Sequence[SampleLike]) -> dict[str, str]:
        """The engine limits' reasons, and first of all the KV cache's (:meth:`_kv_reason`, with its numbers)."""
        out = {s.id: r for s in samples if (r := self._seq_reason(s.context_length, s.max_new_tokens)
                                            or self._kv_reason(s.context_length, s.max_new_tokens)) is not None}
        out.update(preflight([s for s in samples if s.id not in out], self.limits()))
        return out

    # -------------------------------------------------------------------------------------------- generation
    def _sampling(self, req: GenerationRequest) -> Any:
        o = self.options
        kw = dict(max_tokens=req.max_new_tokens, end_id=self.end_ids[0], pad_id=self.pad_id,
                  stop_token_ids=self.end_ids[1:] or None, temperature=o.temperature, top_k=o.top_k,
                  top_p=o.top_p or None, return_perf_metrics=True, detokenize=False)
        if self._sp_fields is not None:
            kw = {k: v for k, v in kw.items() if k in self._sp_fields}
        return self._sampling_cls(**kw)

    def _check_request(self, req: GenerationRequest) -> str | None:
        if not req.prompt_ids:
            return "empty prompt"
        n, g = len(req.prompt_ids), req.max_new_tokens
        return self._seq_reason(n, g) or self._kv_reason(n, g) or check(n, g, self.limits())

    def generate(self, batch: Sequence[GenerationRequest]) -> list[GenerationResult]:
        try:
            return run_checked(batch, self._check_request, self._run_group, self.options.max_batch_size)
        except Exception:
            self._failed = True  # close() then leaves the LLM alone: its shutdown may wait on a stuck worker
            raise

    def _run_group(self, reqs: list[GenerationRequest]) -> list[GenerationResult]:
        n = len(reqs)
        t0 = time.perf_counter()
        pending: list[Any] = []
        for req in reqs:
            try:
                pending.append(self._llm.generate_async({"prompt_token_ids": list(req.prompt_ids)},
                                                        sampling_params=self._sampling(req)))
            except Exception as exc:  # refused at submission (llm.py _check_arguments and friends)
                if is_fatal(exc):
                    raise
                pending.append(exc)
        waits = {i: waiting.Wait(item) for i, item in enumerate(pending) if not isinstance(item, Exception)}
        for w in waits.values():
            w.start()
        timeout = self.options.timeout_s(sum(len(r.prompt_ids) for r in reqs))
        self.deadlines_s.append(timeout)
        deadline = t0 + timeout
        for w in waits.values():
            w.join(max(0.0, deadline - time.perf_counter()))
        late = {i for i, w in waits.items() if w.is_alive()}
        for i in late:
            pending[i].abort()
        grace_end = time.perf_counter() + waiting.ABORT_GRACE_S
        for i in late:
            waits[i].join(max(0.0, grace_end - time.perf_counter()))
        stuck = [reqs[i].sample_id for i in sorted(late) if waits[i].is_alive()]
        if stuck:
            raise RuntimeError(f"tensorrt_llm: aborted requests {stuck} got no final response within "
                               f"{waiting.ABORT_GRACE_S:g} s; the LLM's state is unknown")
        return [self._outcome(req, pending[i], waits.get(i), i in late, t0, n, timeout) for i, req in enumerate(reqs)]

    def _outcome(self, req: GenerationRequest, item: Any, wait: waiting.Wait | None, late: bool, t0: float,
                 n: int, timeout: float) -> GenerationResult:
        if isinstance(item, Exception):
            return error_result(req, one_line(item), n)
        assert wait is not None and wait.ended_at is not None
        latency = wait.ended_at - t0
        if late:
            return error_result(req, f"no final response within request_timeout_s={timeout:g} s: aborted", n, latency)
        if wait.error is not None:
            if is_fatal(wait.error):
                raise wait.error
            return error_result(req, one_line(wait.error), n, latency)
        c = item.outputs[0]
        if c.finish_reason == "cancelled":
            return error_result(req, "the request was cancelled by tensorrt_llm", n, latency)
        reuse = self.options.kv_cache_enable_block_reuse
        timing = engine_timing(getattr(c, "request_perf_metrics", None), block_reuse=reuse) or host_timing(
            latency, None, block_reuse=reuse)
        return to_result(req, c.token_ids, c.finish_reason, timing, tokenizer=self.tokenizer, end_ids=self.end_ids,
                         batch_size=n)

    # ----------------------------------------------------------------------------------------------- records
    def runtime_columns(self) -> dict[str, Any]:
        o = self.options
        return {
            "runtime_model_dir": str(self.model_dir),
            "runtime_tensor_parallel_size": o.tensor_parallel_size,
            "runtime_pipeline_parallel_size": o.pipeline_parallel_size,
            "runtime_max_seq_len": self.max_seq_len,
            "runtime_max_num_tokens": self.max_num_tokens,
            "runtime_enable_chunked_prefill": o.enable_chunked_prefill,
            "runtime_attention_window": self.limits().attention_window,
            "runtime_sink_token_length": o.sink_token_length,
            "runtime_max_batch_size": o.max_batch_size,
            "runtime_max_tokens_in_paged_kv_cache": o.max_tokens_in_paged_kv_cache,
            "runtime_kv_cache_tokens": self.kv_capacity,
            "runtime_kv_cache_capacity_source": self.kv_capacity_source,
            "runtime_kv_cache_free_gpu_memory_fraction": o.kv_cache_free_gpu_memory_fraction,
            "runtime_kv_cache_enable_block_reuse": o.kv_cache_enable_block_reuse,
            "runtime_kv_cache_dtype": o.kv_cache_dtype,
            **o.timeout_columns(),
            "runtime_tokens_per_block": o.tokens_per_block,
            "runtime_fail_fast_on_attention_window": o.fail_fast_on_attention_window_too_large
            if "fail_fast_on_attention_window_too_large" in self.llm_args else None,
            "runtime_timing": "executor",
            "runtime_end_ids": ",".join(str(i) for i in self.end_ids),
            "runtime_temperature": o.temperature,
            "runtime_top_k": o.top_k,
            "runtime_top_p": o.top_p,
        }

    def info(self) -> dict[str, Any]:
        args = {k: (v if isinstance(v, (str, int, float, bool)) or v is None else repr(v))
                for k, v in self.llm_args.items()}
        return {"backend": self.name, "options": dataclasses.asdict(self.options), "tensorrt_llm_version": self.version,
                "llm_args": args, "runtime": self.runtime_columns(), "dropped": list(self.dropped),
                "request_deadlines_s": deadline_summary(self.deadlines_s),
                "end_ids": list(self.end_ids), "pad_id": self.pad_id}

    def row_columns(self) -> dict[str, Any]:
        return {"backend": self.name, "tensorrt_llm_version": self.version, **self.runtime_columns()}

    def close(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None and self._failed:
            _ABANDONED.append(llm)  # never shut down nor destroyed: the error ends the run instead of a hang
        elif llm is not None:
            llm.shutdown()


def _hf_config(model_dir: str) -> dict[str, Any] | None:
    """The Hugging Face config.json of a checkpoint directory, or None (a hub name, an engine dir, no file)."""
    try:
        data = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    from evalctx.capacity.engine_config import is_engine_config

    return data if isinstance(data, dict) and not is_engine_config(data) else None
