"""TensorRT-LLM backend ``trtllm``: a prebuilt engine on the C++ executor, one or several replicas per ``mpirun``.

Every rank of a replica builds the executor together (leader mode); only the replica leader enqueues requests and
gets responses, while the other ranks' executor threads serve the collectives in the background, so their results
are placeholders the runner ignores. How ranks find their replica and GPU is in :mod:`.launch`; why the executor
is driven directly and how a batch always ends is in :mod:`.executor`. Written against the 1.2 sources named in
docs/trtllm.md and tested with a stand-in package (tests/standin); it has not yet run against a real engine.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

from evalctx.backends.base import Backend, BackendContext
from evalctx.backends.trtllm import executor as ex
from evalctx.backends.trtllm import lora
from evalctx.backends.trtllm.launch import Placement, check_visible, executor_device, place
from evalctx.backends.trtllm.outputs import (default_end_ids, default_pad_id, engine_timing, error_result,
                                             host_timing, is_fatal, one_line, run_checked, to_result)
from evalctx.capacity.engine_config import EngineConfig, load_engine_config
from evalctx.errors import UsageError, require_extra
from evalctx.capacity.preflight import EngineLimits, SampleLike, check, limits_from_engine, preflight
from evalctx.records import GenerationRequest, GenerationResult
from evalctx.models.tokenizer_check import check_tokenizer

log = logging.getLogger("evalctx.backends.trtllm")
_ABANDONED: list[Any] = []
"""Executors of failed runs, never shut down (their execution thread may be stuck) nor destroyed."""


@dataclass
class SharedOptions:
    """Options of both TensorRT-LLM backends (engine and LLM API)."""

    max_tokens_in_paged_kv_cache: int | None = None
    """KV-cache cap in tokens (the runtime takes min with the fraction); see ``evalctx plan``."""
    kv_cache_free_gpu_memory_fraction: float = 0.9
    kv_cache_enable_block_reuse: bool = False
    """Off: reused haystack prefixes would make TTFT and latency look better than they are."""
    max_attention_window_size: int | None = None
    """A sliding window (tokens further back are not attended to); default: the engine's max_seq_len."""
    sink_token_length: int | None = None
    """StreamingLLM sink tokens kept in view with a sliding window."""
    fail_fast_on_attention_window_too_large: bool = True
    """Fail at load instead of shrinking the attention window when the KV cache cannot hold one sequence (>= 1.0)."""
    max_batch_size: int = 1
    end_ids: list[int] | None = None
    """Ids that end an answer; default: generation_config.json's eos_token_id(s) and the tokenizer's EOS."""
    pad_id: int | None = None
    """Default: the tokenizer's pad token, else the first end id."""
    temperature: float = 1.0
    top_k: int = 1
    """1 = greedy."""
    top_p: float = 0.0
    request_timeout_s: float | None = None
    """Seconds after enqueue at which a batch's requests without a final response are cancelled and become error
    rows. None: scaled with the batch's prompt tokens, :data:`TIMEOUT_BASE_S` + :data:`TIMEOUT_PER_TOKEN_S` per
    token (a 70B 1M-token prefill on 8 GPUs takes minutes; the deadline is for stuck requests, not slow ones)."""

    def __post_init__(self) -> None:
        """Values TensorRT-LLM would refuse deep inside (or, for the timeout, turn into all-error runs)."""
        bad = [f"{name}={getattr(self, name)!r} (want {want})" for name, ok, want in (
            ("request_timeout_s", self.request_timeout_s is None or self.request_timeout_s > 0,
             "> 0 seconds, or unset to scale with the prompt"),
            ("max_batch_size", self.max_batch_size >= 1, ">= 1"),
            ("kv_cache_free_gpu_memory_fraction", 0 < self.kv_cache_free_gpu_memory_fraction <= 1, "in (0, 1]"),
            ("max_tokens_in_paged_kv_cache", _at_least(self.max_tokens_in_paged_kv_cache, 1), ">= 1 tokens"),
            ("max_attention_window_size", _at_least(self.max_attention_window_size, 1), ">= 1 tokens"),
            ("sink_token_length", _at_least(self.sink_token_length, 0), ">= 0 tokens"),
            ("end_ids", self.end_ids is None or all(i >= 0 for i in self.end_ids), "token ids >= 0"),
        ) if not ok]
        if bad:
            raise UsageError(f"backend option {bad[0]}")


    def timeout_s(self, prompt_tokens: int) -> float:
        """The deadline in seconds for a batch of ``prompt_tokens`` prompt tokens in all: ``request_timeout_s`` when
        set, else :data:`TIMEOUT_BASE_S` + :data:`TIMEOUT_PER_TOKEN_S` x ``prompt_tokens``."""
        if self.request_timeout_s is not None:
            return float(self.request_timeout_s)
        return TIMEOUT_BASE_S + TIMEOUT_PER_TOKEN_S * max(0, prompt_tokens)

    def timeout_columns(self) -> dict[str, Any]:
        """The deadline rule as row columns, so every row shows the deadline it ran under: a batch of P prompt
        tokens in all gets ``runtime_request_timeout_base_s + runtime_request_timeout_per_token_s x P`` seconds;
        ``runtime_request_timeout_s`` is the given value, or None where it scales with the prompt (a number or None
        in every run, so that runs concatenate into one float column; the two rule columns are always numbers)."""
        if self.request_timeout_s is not None:
            return {"runtime_request_timeout_s": float(self.request_timeout_s),
                    "runtime_request_timeout_base_s": float(self.request_timeout_s),
                    "runtime_request_timeout_per_token_s": 0.0}
        return {"runtime_request_timeout_s": None,
                "runtime_request_timeout_base_s": TIMEOUT_BASE_S,
                "runtime_request_timeout_per_token_s": TIMEOUT_PER_TOKEN_S}


def deadline_summary(applied: list[float]) -> dict[str, Any] | None:
    """The per-batch deadlines a run applied, for the manifest: how many batches, the shortest and the longest."""
    if not applied:
        return None
    return {"batches": len(applied), "min_s": round(min(applied), 3), "max_s": round(max(applied), 3)}


TIMEOUT_BASE_S = 600.0
"""The default deadline's fixed part: engine warm-up, queueing, and the answer's decode steps."""
TIMEOUT_PER_TOKEN_S = 0.004
"""The default deadline's part per prompt token: 4 ms, so 1,048,576 tokens get 600 + 4194 s. A 70B model's 1M
prefill is about 1.5e18 FLOPs (the quadratic attention most of it): some 8 minutes on 8 H100s at 40% of peak; the
margin covers slower GPUs, pipeline parallelism and a loaded node."""


def _at_least(value: int | None, low: int) -> bool:
    """An optional setting is unset or at least ``low``."""
    return value is None or value >= low


def runtime_max_input_len(engine: EngineConfig, chunked: bool) -> int | None:
    """The longest prompt the C++ runtime takes (batch_manager/trtGptModel.h): max_seq_len - 1 with chunked context
    or with context FMHA on packed input (the 1.x defaults; then max_num_tokens also bounds it, which preflight
    checks on its own), else the build-time max_input_len."""
    if engine.max_seq_len is None:
        return None
    fmha_packed = engine.context_fmha is not False and engine.remove_input_padding is not False
    return engine.max_seq_len - 1 if chunked or fmha_packed else engine.max_input_len


class TRTLLMBackend(Backend):
    name = "trtllm"

    @dataclass
    class Options(SharedOptions):
        engine_dir: str | None = None
        """Engine directory (trtllm-build --output_dir); default: --model."""
        tokenizer_dir: str | None = None
        """Tokenizer to load only when the runner passes none (it normally passes --tokenizer)."""
        enable_chunked_context: bool | None = None
        """None: on when the engine can (paged KV cache and paged context FMHA); 1M prompts need it."""
        multi_block_mode: bool | None = None
        """None: the runtime default (on in 1.x)."""
        enable_context_fmha_fp32_acc: bool | None = None
        lora_dir: list[str] | None = None
        """LoRA adapters; uids are "0", "1", ... in this order (the engine needs lora_plugin)."""
        lora_ckpt_source: str | None = None
        """hf or nemo; default: hf for lora_dir, the engine's build_config.lora_config.lora_ckpt_source for the
        adapters stored in the engine (as ModelRunnerCpp.from_dir)."""
        lora_task_uid: str | None = None
        """Uid for requests whose ``extra`` carries no ``lora_task_uid``; "-1" = no adapter."""
        streaming_ttft: bool = False
        """Only for releases without executor perf metrics: stream to time the first token on the host."""

    @classmethod
    def ranks_per_replica(cls, options: Any, model: str | None) -> int:
        return load_engine_config(_engine_dir(options, model)).world_size

    def __init__(self, options: Options, ctx: BackendContext) -> None:
        super().__init__(options, ctx)
        self.engine: EngineConfig = load_engine_config(_engine_dir(options, ctx.model))
        self.rank = ctx.rank_in_replica
        self.is_leader = self.rank == 0
        self.replicas = self._check_world()
        self._check_sizes()
        self.chunked_context = self._resolve_chunked()
        self.max_input_len = runtime_max_input_len(self.engine, self.chunked_context)
        seq = self.engine.max_seq_len or 0
        self.attention_window = min(options.max_attention_window_size or seq, seq)
        self.sink_tokens = options.sink_token_length or 0
        self.tokenizer = ctx.tokenizer if ctx.tokenizer is not None else self._load_tokenizer()
        # Before the engine loads: ids beyond its vocabulary would crash or read other embeddings silently.
        check_tokenizer(self.tokenizer, str(self.engine.path), self.engine.vocab_size)
        self.end_ids = list(options.end_ids or default_end_ids(self.tokenizer, options.tokenizer_dir))
        if not self.end_ids:
            raise UsageError("no end-of-answer token is known: pass --backend-opt end_ids=ID[,ID]")
        self.pad_id = options.pad_id if options.pad_id is not None else default_pad_id(self.tokenizer, self.end_ids)
        self.version: str | None = None
        self.dropped: list[str] = []
        self.deadlines_s: list[float] = []
        """The deadline each batch was given (request_timeout_s, or the rule scaled with its prompt tokens)."""
        self.applied: dict[str, Any] = {}
        self.placement = Placement(None, None, None)
        self._lora: Any = None
        self._executor: Any = None
        self._failed = False
        self._load()

    # ----------------------------------------------------------------------------------------- construction
    def _check_world(self) -> int:
        """Checked before loading: a mismatch would otherwise fail deep inside the executor."""
        need, ctx = self.engine.world_size, self.ctx
        if ctx.replica_comm is not None:
            have = int(ctx.replica_comm.Get_size())
        else:
            # No replica communicator: one replica spanning the world, or (dist.py) one-rank replicas.
            have = need if ctx.world_size == need else 1
        if have != need:
            raise UsageError(
                f"engine {self.engine.path} was built for tp {self.engine.tp} x pp {self.engine.pp} x cp "
                f"{self.engine.cp} = {need} ranks but this replica has {have}: run mpirun -n {need} "
                f"(or a multiple of {need} for several replicas)"
            )
        return max(1, ctx.world_size // need)

    def _check_sizes(self) -> None:
        o, e = self.options, self.engine
        if e.max_seq_len is None:
            raise UsageError(f"{e.path}/config.json has no max_seq_len: rebuild with --max_seq_len")
        if e.max_batch_size and o.max_batch_size > e.max_batch_size:
            raise UsageError(f"max_batch_size {o.max_batch_size} > the engine's {e.max_batch_size}: lower "
                             "--backend-opt max_batch_size or rebuild with a larger --max_batch_size")

    def _resolve_chunked(self) -> bool:
        asked, able = self.options.enable_chunked_context, self.engine.supports_chunked_context
        if asked and not able and self.is_leader:
            # The executor would only warn and turn it off (checkOptionalParams); preflight reports what then fails.
            log.warning("engine %s has no paged context FMHA (or no paged KV cache): chunked context is off",
                        self.engine.path)
        return able if asked is None else bool(asked and able)

    def _load_tokenizer(self) -> Any:
        if not self.options.tokenizer_dir:
            raise UsageError("backend trtllm needs a tokenizer: pass --tokenizer DIR")
        from evalctx.models.tokenizer import load_tokenizer

        return load_tokenizer(self.options.tokenizer_dir)

    def _load(self) -> None:
        require_extra("tensorrt_llm", "trtllm")
        try:
            import tensorrt_llm
        except ImportError as exc:
            raise UsageError(f"tensorrt_llm cannot be imported ({exc}): pip install 'evalctx[trtllm]'") from None
        self.version = str(getattr(tensorrt_llm, "__version__", "unknown"))
        trt = ex.import_bindings()
        ctx, e, o = self.ctx, self.engine, self.options
        self.placement = place(world_rank=ctx.world_rank, world_size=ctx.world_size, ranks_per_replica=e.world_size,
                               replica_comm=ctx.replica_comm, tp=e.tp, pp=e.pp, gpus_per_node=e.gpus_per_node or 8)
        check_visible(executor_device(self.placement, world_rank=ctx.world_rank, tp=e.tp, pp=e.pp,
                                      gpus_per_node=e.gpus_per_node or 8), ctx.world_rank)
        kv = self._kv_cache_config(trt)
        self._window_in_effect(kv)
        config = trt.ExecutorConfig(max_beam_width=1, max_batch_size=o.max_batch_size, kv_cache_config=kv)
        self._require(ex.set_optional(config, "parallel_config", ex.parallel_config(trt, self.placement),
                                      self.dropped, "ExecutorConfig"), "ExecutorConfig.parallel_config")
        applied = ex.set_optional(config, "enable_chunked_context", self.chunked_context, self.dropped,
                                  "ExecutorConfig")
        self._require(applied or not self.chunked_context, "ExecutorConfig.enable_chunked_context")
        fail_fast = o.fail_fast_on_attention_window_too_large
        if ex.set_optional(config, "fail_fast_on_attention_window_too_large", fail_fast, self.dropped,
                           "ExecutorConfig"):
            self.applied["fail_fast_on_attention_window_too_large"] = fail_fast
        elif fail_fast and self.is_leader:
            # Recorded as not applied (runtime_fail_fast_on_attention_window is None), never as on.
            log.warning("tensorrt_llm %s cannot fail fast: a KV cache smaller than the attention window (%s tokens) "
                        "shrinks it silently; preflight refuses only what max_tokens_in_paged_kv_cache (%s) cannot "
                        "hold: set it to the 'max tokens' the engine logs at load", self.version,
                        self.attention_window, o.max_tokens_in_paged_kv_cache)
        self._perf_knobs(trt, config)
        self._load_lora(trt, config)
        self._executor = ex.build_executor(trt, e, config)
        self._output, self._excluded, self._perf = ex.output_config(trt, self.dropped)
        self._streaming = bool(o.streaming_ttft and not self._perf)
        self._sampling = trt.SamplingConfig(1, top_k=o.top_k, top_p=o.top_p or None, temperature=o.temperature)
        self._trt = trt
        if self.dropped and self.is_leader:
            log.warning("tensorrt_llm %s has no %s; dropped (runtime defaults apply)", self.version,
                        ", ".join(self.dropped))

    def _require(self, ok: bool, name: str) -> None:
        if not ok:
            raise UsageError(f"tensorrt_llm {self.version} has no {name}, which evalctx needs for correct results: "
                             "install tensorrt_llm >= 1.2 (pip install 'evalctx[trtllm]')")

    def _kv_cache_config(self, trt: Any) -> Any:
        o = self.options
        defaults = None
        try:
            from tensorrt_llm.bindings import GptJsonConfig
        except ImportError:
            GptJsonConfig = None
        if GptJsonConfig is not None:
            defaults = getattr(GptJsonConfig.parse_file(f"{self.engine.path}/config.json"), "runtime_defaults", None)
        return ex.kv_cache_config(trt, fraction=o.kv_cache_free_gpu_memory_fraction,
                                  block_reuse=o.kv_cache_enable_block_reuse, max_tokens=o.max_tokens_in_paged_kv_cache,
                                  window=o.max_attention_window_size, sink_tokens=o.sink_token_length,
                                  runtime_defaults=defaults, dropped=self.dropped)

    def _window_in_effect(self, kv: Any) -> None:
        """The attention window and sink tokens the executor will use, read back from the built KvCacheConfig: it
        holds the engine's own runtime defaults (a model's sliding window in config.json, filled in by
        ``fillEmptyFieldsFromRuntimeDefaults`` where no option was given), which preflight must know too. With one
        window per layer the largest counts (a full-attention layer sees the whole prompt), clipped to max_seq_len
        as the runtime clips it."""
        windows = getattr(kv, "max_attention_window", None)
        if windows:
            self.attention_window = min(max(int(w) for w in windows), self.engine.max_seq_len or 0)
        sinks = getattr(kv, "sink_token_length", None)
        self.sink_tokens = int(sinks) if sinks else 0

    def _perf_knobs(self, trt: Any, config: Any) -> None:
        """multi_block_mode and FMHA fp32 accumulation, as from_dir sets them; None leaves the runtime default."""
        o = self.options
        wanted = {"multi_block_mode": o.multi_block_mode,
                  "enable_context_fmha_fp32_acc": o.enable_context_fmha_fp32_acc}
        if all(v is None for v in wanted.values()):
            return
        knobs = trt.ExtendedRuntimePerfKnobConfig()
        for name, value in wanted.items():
            if value is not None and ex.set_optional(knobs, name, value, self.dropped, "ExtendedRuntimePerfKnobConfig"):
                self.applied[name] = value
        ex.set_optional(config, "extended_runtime_perf_knob_config", knobs, self.dropped, "ExecutorConfig")

    def _load_lora(self, trt: Any, config: Any) -> None:
        o, e = self.options, self.engine
        if o.lora_dir and not e.lora_plugin:
            raise UsageError(f"lora_dir given but engine {e.path} was built without lora_plugin")
        if not e.lora_plugin:
            return
        dirs, source = lora.adapter_dirs(e, o.lora_dir, o.lora_ckpt_source)
        size = 0
        if self.is_leader:  # only the leader enqueues, so only it holds the weights (as from_dir)
            self._lora, size = lora.load_manager(e, dirs, source)
        if self.ctx.replica_comm is not None:
            size = self.ctx.replica_comm.bcast(size, root=0)
        peft = trt.PeftCacheConfig(num_host_module_layer=size, num_device_module_layer=size)
        self._require(ex.set_optional(config, "peft_cache_config", peft, self.dropped, "ExecutorConfig"),
                      "ExecutorConfig.peft_cache_config")
        self.applied["lora_dir"] = ",".join(dirs)

    # --------------------------------------------------------------------------------------------- preflight
    def limits(self) -> EngineLimits:
        base = limits_from_engine(self.engine, max_input_len=self.max_input_len, chunked_context=self.chunked_context,
                                  kv_cache_tokens=self.options.max_tokens_in_paged_kv_cache)
        return dataclasses.replace(base, attention_window=self.attention_window, sink_tokens=self.sink_tokens)

    def preflight(self, samples: Sequence[SampleLike]) -> dict[str, str]:
        return preflight(samples, self.limits())

    # -------------------------------------------------------------------------------------------- generation
    def _lora_uid(self, req: GenerationRequest) -> str | None:
        uid = req.extra.get("lora_task_uid", self.options.lora_task_uid)
        return None if uid is None else str(uid)  # the weights are keyed by *string* uid

    def _check_request(self, req: GenerationRequest) -> str | None:
        """Never truncate: a request the runtime would reject, or whose answer it would cut, is an error row."""
        if not req.prompt_ids:
            return "empty prompt"
        uid = self._lora_uid(req)
        if uid not in (None, "-1") and not self.engine.lora_plugin:
            return "lora_task_uid given but the engine was built without lora_plugin"
        return check(len(req.prompt_ids), req.max_new_tokens, self.limits())

    def generate(self, batch: Sequence[GenerationRequest]) -> list[GenerationResult]:
        if not self.is_leader:
            # Leader mode: this rank enqueues nothing; its executor threads serve the replica in the background.
            n = len(batch)
            return [GenerationResult(text=None, n_prompt_tokens=len(r.prompt_ids), batch_size=n) for r in batch]
        try:
            return run_checked(batch, self._check_request, self._run_group, self.options.max_batch_size)
        except Exception:
            # The run ends here (CUDA/NCCL/out-of-memory, or requests the executor never ended): its execution thread
            # may be stuck, and shutdown() would join it forever instead of letting the error end the job.
            self._failed = True
            raise

    def _request(self, req: GenerationRequest) -> Any:
        lora_config = lora.request_config(self._trt, self._lora, self._lora_uid(req)) if self._lora else None
        return ex.make_request(self._trt, req.prompt_ids, req.max_new_tokens, end_ids=self.end_ids,
                               pad_id=self.pad_id, sampling=self._sampling, output=self._output,
                               streaming=self._streaming, lora=lora_config)

    def _run_group(self, reqs: list[GenerationRequest]) -> list[GenerationResult]:
        n = len(reqs)
        results: list[GenerationResult | None] = [None] * n
        built: list[tuple[int, Any]] = []
        for i, req in enumerate(reqs):
            try:
                built.append((i, self._request(req)))
            except (KeyError, ValueError, TypeError) as exc:
                results[i] = error_result(req, one_line(exc), n)
        t0 = time.perf_counter()
        try:
            ids = list(self._executor.enqueue_requests([r for _, r in built])) if built else []
        except Exception as exc:
            if is_fatal(exc):
                raise
            return [r or error_result(req, one_line(exc), n) for r, req in zip(results, reqs)]
        timeout = self.options.timeout_s(sum(len(r.prompt_ids) for r in reqs))
        self.deadlines_s.append(timeout)
        outcomes = ex.collect(self._executor, ids, t0=t0, timeout_s=timeout,
                              streaming=self._streaming)
        for (i, _), rid in zip(built, ids):
            results[i] = self._result(reqs[i], outcomes[rid], n)
        return [r for r in results if r is not None]

    def _result(self, req: GenerationRequest, out: ex.Outcome, batch_size: int) -> GenerationResult:
        if out.error is not None:
            if is_fatal(out.error):
                raise RuntimeError(f"tensorrt_llm: {out.error}")
            return error_result(req, out.error, batch_size, out.host_latency_s)
        tokens = out.tokens
        if not self._excluded and not self._streaming:
            # A release without exclude_input_from_output returns the prompt first (non-streaming responses only).
            p = len(req.prompt_ids)
            if tokens[:p] != list(req.prompt_ids):
                return error_result(req, "output does not start with the prompt: unexpected tensorrt_llm output",
                                    batch_size, out.host_latency_s)
            tokens = tokens[p:]
        block_reuse = self.options.kv_cache_enable_block_reuse
        timing = engine_timing(out.perf, block_reuse=block_reuse) or host_timing(
            out.host_latency_s, out.host_first_token_s if self._streaming else None, block_reuse=block_reuse)
        return to_result(req, tokens, out.finish, timing, tokenizer=self.tokenizer, end_ids=self.end_ids,
                         batch_size=batch_size)

    # ----------------------------------------------------------------------------------------------- records
    def runtime_columns(self) -> dict[str, Any]:
        """``runtime_*`` columns: the limits and settings the executor runs with (None where a release lacked one)."""
        o = self.options
        return {
            "runtime_max_seq_len": self.engine.max_seq_len,
            "runtime_max_input_len": self.max_input_len,
            "runtime_attention_window": self.attention_window,
            "runtime_sink_token_length": self.sink_tokens or None,
            "runtime_max_batch_size": o.max_batch_size,
            "runtime_enable_chunked_context": self.chunked_context,
            "runtime_max_tokens_in_paged_kv_cache": o.max_tokens_in_paged_kv_cache,
            "runtime_kv_cache_free_gpu_memory_fraction": o.kv_cache_free_gpu_memory_fraction,
            "runtime_kv_cache_enable_block_reuse": o.kv_cache_enable_block_reuse,
            "runtime_multi_block_mode": self.applied.get("multi_block_mode"),
            "runtime_enable_context_fmha_fp32_acc": self.applied.get("enable_context_fmha_fp32_acc"),
            "runtime_fail_fast_on_attention_window": self.applied.get("fail_fast_on_attention_window_too_large"),
            "runtime_lora_dir": self.applied.get("lora_dir"),
            **o.timeout_columns(),
            "runtime_world_size": self.engine.world_size,
            "runtime_replicas": self.replicas,
            "runtime_timing": "executor" if self._perf else "host",
            "runtime_end_ids": ",".join(str(i) for i in self.end_ids),
            "runtime_temperature": o.temperature,
            "runtime_top_k": o.top_k,
            "runtime_top_p": o.top_p,
        }

    def info(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "options": dataclasses.asdict(self.options),
            "tensorrt_llm_version": self.version,
            "engine": self.engine.to_manifest(),
            "runtime": self.runtime_columns(),
            "placement": dataclasses.asdict(self.placement),
            "dropped": list(self.dropped),
            "request_deadlines_s": deadline_summary(self.deadlines_s),
            "end_ids": list(self.end_ids),
            "pad_id": self.pad_id,
        }

    def row_columns(self) -> dict[str, Any]:
        return {"backend": self.name, "tensorrt_llm_version": self.version, **self.engine.to_columns(),
                **self.runtime_columns()}

    def close(self) -> None:
        # Followers' execution threads end on the leader's terminate request (leader mode). After a failed
        # generate the executor is left alone (kept referenced, so no destructor runs its shutdown either): the
        # error then ends the job (MPI_Abort under mpirun) rather than a join on a stuck thread hanging it.
        executor, self._executor = self._executor, None
        if executor is None:
            return
        if self._failed:
            _ABANDONED.append(executor)
            return
        executor.shutdown()


def _engine_dir(options: Any, model: str | None) -> str:
    path = getattr(options, "engine_dir", None) or model
    if not path:
        raise UsageError("backend trtllm needs an engine directory: --model ENGINE_DIR or --backend-opt engine_dir=DIR")
    return str(path)
