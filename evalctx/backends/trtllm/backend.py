"""TensorRT-LLM backend: a prebuilt engine run through ``ModelRunnerCpp`` (the C++ executor), 1.2 API.

Written against the documented tensorrt_llm 1.2 API and tested with a stand-in package only: it has not yet run
against a real engine. Keyword arguments the installed release lacks are dropped with a warning (checked with
``inspect.signature``), except those without which results would be wrong; those raise a UsageError.

MPI: every rank of a replica builds the runner and calls ``generate`` with the same batch, as TensorRT-LLM's
leader mode wants. Ranks other than the replica's rank 0 get nothing back (their executor threads serve the
collectives in the background), so their results are placeholders the runner ignores. How ranks and GPUs are
chosen is in :mod:`evalctx.backends.trtllm.support`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

from evalctx.backends.base import Backend, BackendContext
from evalctx.backends.trtllm.support import (filter_kwargs, is_fatal, replica_device_ids, session_comm, synchronize,
                                             use_replica_session)
from evalctx.engine_config import EngineConfig, load_engine_config
from evalctx.errors import UsageError, require_extra
from evalctx.preflight import EngineLimits, SampleLike, limits_from_engine, preflight
from evalctx.records import GenerationRequest, GenerationResult

log = logging.getLogger("evalctx.backends.trtllm")

# Without these the run is wrong rather than slower: a missing runtime max_input_len falls back to the engine's
# build value (1024 by default) and long prompts fail; a missing rank breaks the MPI assert.
REQUIRED_FROM_DIR = ("engine_dir", "rank", "max_input_len", "max_output_len")
REQUIRED_GENERATE = ("max_new_tokens", "end_id", "pad_id", "return_dict", "output_sequence_lengths")
# generate() takes these through **kwargs into trtllm.SamplingConfig, so the signature cannot list them.
SAMPLING_KWARGS = frozenset({"num_beams", "top_k", "top_p", "temperature", "random_seed", "length_penalty",
                             "repetition_penalty", "presence_penalty", "frequency_penalty", "min_tokens"})
DEFAULT_MAX_NEW_TOKENS = 64


def _engine_dir(options: Any, model: str | None) -> str:
    path = getattr(options, "engine_dir", None) or model
    if not path:
        raise UsageError("backend trtllm needs an engine directory: --model ENGINE_DIR or --backend-opt engine_dir=DIR")
    return str(path)


class TRTLLMBackend(Backend):
    name = "trtllm"

    @dataclass
    class Options:
        engine_dir: str | None = None
        """Engine directory (trtllm-build --output_dir); default: --model."""
        tokenizer_dir: str | None = None
        """Tokenizer to load only when the runner passes none (it normally passes --tokenizer)."""
        enable_chunked_context: bool | None = None
        """None: on when the engine can (paged KV cache and paged context FMHA); 1M prompts need it."""
        max_tokens_in_paged_kv_cache: int | None = None
        """KV-cache cap in tokens (the runtime takes min with the fraction); see ``evalctx plan``."""
        kv_cache_free_gpu_memory_fraction: float = 0.9
        kv_cache_enable_block_reuse: bool = False
        """Off: reused haystack prefixes would make TTFT and latency look better than they are."""
        multi_block_mode: bool | None = None
        """None: the runtime default (on in 1.x)."""
        enable_context_fmha_fp32_acc: bool | None = None
        max_attention_window_size: int | None = None
        """A sliding window: tokens further back than this are not attended to."""
        fail_fast_on_attention_window_too_large: bool = True
        """Error out instead of shrinking the attention window when the KV cache is too small (>= 1.0)."""
        max_batch_size: int = 1
        lora_dir: list[str] | None = None
        """LoRA adapters; uids are "0", "1", ... in this order (the engine needs lora_plugin)."""
        lora_ckpt_source: str = "hf"
        lora_task_uid: str | None = None
        """Uid for requests whose ``extra`` carries no ``lora_task_uid``; "-1" = no adapter."""
        streaming_ttft: bool = False
        """Measure time to first token by streaming (costs a host round trip per step)."""
        end_id: int | None = None
        """Default: the tokenizer's EOS."""
        pad_id: int | None = None
        """Default: the tokenizer's pad token, else end_id."""
        temperature: float = 1.0
        top_k: int = 1
        """1 = greedy."""
        top_p: float = 0.0

    @classmethod
    def ranks_per_replica(cls, options: Any, model: str | None) -> int:
        return load_engine_config(_engine_dir(options, model)).world_size

    def __init__(self, options: Options, ctx: BackendContext) -> None:
        super().__init__(options, ctx)
        self.engine: EngineConfig = load_engine_config(_engine_dir(options, ctx.model))
        self.rank = ctx.rank_in_replica
        self.is_leader = self.rank == 0
        self.replicas = self._check_world()
        self.max_output_len, self.max_input_len = self._runtime_lengths()
        self.chunked_context = self._resolve_chunked()
        self.tokenizer = ctx.tokenizer if ctx.tokenizer is not None else self._load_tokenizer()
        self.end_id, self.pad_id = self._special_ids()
        self.version: str | None = None
        self.runner_kwargs: dict[str, Any] = {}
        self.dropped: list[str] = []
        self._generate_dropped: list[str] = []
        self._runner: Any = None
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
        if not 0 <= self.rank < need:
            raise UsageError(f"rank {self.rank} is outside the engine's {need} ranks")
        return max(1, ctx.world_size // need)

    def _runtime_lengths(self) -> tuple[int, int]:
        """Runtime max_output_len and max_input_len, always explicit: from_dir asserts their sum <= max_seq_len."""
        seq, o = self.engine.max_seq_len, self.options
        if self.engine.max_batch_size and o.max_batch_size > self.engine.max_batch_size:
            raise UsageError(f"max_batch_size {o.max_batch_size} > the engine's {self.engine.max_batch_size}: "
                             "lower --backend-opt max_batch_size or rebuild with a larger --max_batch_size")
        if seq is None:
            raise UsageError(f"{self.engine.path}/config.json has no max_seq_len: rebuild with --max_seq_len")
        out = self.ctx.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
        if out >= seq:
            raise UsageError(f"max_new_tokens {out} leaves no room for a prompt in max_seq_len {seq}")
        wanted = self.ctx.max_input_len if self.ctx.max_input_len is not None else seq - out
        inp = min(wanted, seq - out)
        if inp < wanted and self.is_leader:
            log.warning("runtime max_input_len lowered from %d to %d (engine max_seq_len %d - max_output_len %d); "
                        "longer prompts are reported unsupported", wanted, inp, seq, out)
        return out, inp

    def _resolve_chunked(self) -> bool:
        asked, able = self.options.enable_chunked_context, self.engine.supports_chunked_context
        if asked and not able and self.is_leader:
            # TensorRT-LLM would only warn and turn it off; preflight reports the prompts that then cannot run.
            log.warning("engine %s has no paged context FMHA (or no paged KV cache): chunked context is off",
                        self.engine.path)
        return able if asked is None else bool(asked and able)

    def _load_tokenizer(self) -> Any:
        if not self.options.tokenizer_dir:
            raise UsageError("backend trtllm needs a tokenizer: pass --tokenizer DIR")
        from evalctx.tokenizer import load_tokenizer

        return load_tokenizer(self.options.tokenizer_dir)

    def _special_ids(self) -> tuple[int, int]:
        tok = self.tokenizer
        end_id = self.options.end_id if self.options.end_id is not None else getattr(tok, "eos_token_id", None)
        if end_id is None:
            raise UsageError("the tokenizer has no EOS token: pass --backend-opt end_id=N")
        pad = self.options.pad_id
        if pad is None:
            pad = getattr(tok, "pad_token_id", None)
        if pad is None:
            pad = getattr(getattr(tok, "hf", None), "pad_token_id", None)
        return int(end_id), int(end_id if pad is None else pad)

    def _load(self) -> None:
        require_extra("tensorrt_llm", "trtllm")
        try:
            import tensorrt_llm
            from tensorrt_llm import runtime as trt_runtime
        except ImportError as exc:
            raise UsageError(f"tensorrt_llm cannot be imported ({exc}): pip install 'evalctx[trtllm]'") from None
        self.version = str(getattr(tensorrt_llm, "__version__", "unknown"))
        runner_cls = getattr(trt_runtime, "ModelRunnerCpp", None)
        if runner_cls is None or not getattr(trt_runtime, "PYTHON_BINDINGS", True):
            raise UsageError(f"tensorrt_llm {self.version} has no C++ bindings (ModelRunnerCpp): reinstall it")
        device_ids = None
        if self.replicas > 1:
            need = self.engine.world_size
            comm = session_comm(self.ctx.replica_comm, need)
            use_replica_session(comm, replica=self.ctx.replica, rank=self.rank, version=self.version,
                                replicas=self.replicas, ranks_per_replica=need)
            device_ids = replica_device_ids(comm, self.ctx.world_rank, self.engine.gpus_per_node or 8,
                                            warn=self.is_leader)
        mpi_rank = getattr(tensorrt_llm, "mpi_rank", None)
        if callable(mpi_rank) and mpi_rank() != self.rank:
            raise UsageError(f"tensorrt_llm sees MPI rank {mpi_rank()} where evalctx expects {self.rank}: "
                             f"start with mpirun -n {self.engine.world_size * self.replicas} evalctx run ...")
        wanted = self._runner_kwargs(device_ids)
        self.runner_kwargs, self.dropped = filter_kwargs(runner_cls.from_dir, wanted)
        required = set(REQUIRED_FROM_DIR) | {k for k in ("enable_chunked_context", "max_tokens_in_paged_kv_cache",
                                                           "device_ids") if wanted.get(k)}
        self._refuse_missing(required & set(self.dropped), "ModelRunnerCpp.from_dir")
        if self.dropped and self.is_leader:
            log.warning("tensorrt_llm %s: ModelRunnerCpp.from_dir has no %s; dropped (runtime defaults apply)",
                        self.version, ", ".join(self.dropped))
        self._runner = runner_cls.from_dir(**self.runner_kwargs)
        _, missing = filter_kwargs(self._runner.generate, self._generate_kwargs([], lora=True), SAMPLING_KWARGS)
        self._refuse_missing(set(REQUIRED_GENERATE) & set(missing), "ModelRunnerCpp.generate")
        self._generate_dropped = missing
        if missing and self.is_leader:
            log.warning("tensorrt_llm %s: ModelRunnerCpp.generate has no %s; dropped", self.version, ", ".join(missing))

    def _refuse_missing(self, names: set[str], where: str) -> None:
        if names:
            raise UsageError(f"tensorrt_llm {self.version}: {where} has no {', '.join(sorted(names))}, which evalctx "
                             "needs for correct results: install tensorrt_llm >= 1.2 (pip install 'evalctx[trtllm]')")

    def _runner_kwargs(self, device_ids: list[int] | None) -> dict[str, Any]:
        o = self.options
        kw: dict[str, Any] = dict(
            engine_dir=self.engine.path, rank=self.rank, max_batch_size=o.max_batch_size,
            max_input_len=self.max_input_len, max_output_len=self.max_output_len, max_beam_width=1,
            kv_cache_free_gpu_memory_fraction=o.kv_cache_free_gpu_memory_fraction,
            kv_cache_enable_block_reuse=o.kv_cache_enable_block_reuse,
            enable_chunked_context=self.chunked_context,
            fail_fast_on_attention_window_too_large=o.fail_fast_on_attention_window_too_large,
        )
        optional = {"max_tokens_in_paged_kv_cache": o.max_tokens_in_paged_kv_cache,
                    "multi_block_mode": o.multi_block_mode,
                    "enable_context_fmha_fp32_acc": o.enable_context_fmha_fp32_acc,
                    "max_attention_window_size": [o.max_attention_window_size] if o.max_attention_window_size else None,
                    "device_ids": device_ids}
        kw.update({k: v for k, v in optional.items() if v is not None})
        if o.lora_dir:
            kw.update(lora_dir=list(o.lora_dir), lora_ckpt_source=o.lora_ckpt_source)
        return kw

    # --------------------------------------------------------------------------------------------- preflight
    def limits(self) -> EngineLimits:
        return limits_from_engine(self.engine, max_input_len=self.max_input_len, chunked_context=self.chunked_context,
                                  kv_cache_tokens=self.options.max_tokens_in_paged_kv_cache)

    def preflight(self, samples: Sequence[SampleLike]) -> dict[str, str]:
        return preflight(samples, self.limits())

    # -------------------------------------------------------------------------------------------- generation
    def _generate_kwargs(self, reqs: Sequence[GenerationRequest], lora: bool = False) -> dict[str, Any]:
        o = self.options
        kw: dict[str, Any] = dict(
            max_new_tokens=max((r.max_new_tokens for r in reqs), default=1), end_id=self.end_id, pad_id=self.pad_id,
            temperature=o.temperature, top_k=o.top_k, top_p=o.top_p, num_beams=1,
            output_sequence_lengths=True, return_dict=True, streaming=o.streaming_ttft,
        )
        uids = [self._lora_uid(r) for r in reqs]
        if lora or any(u is not None for u in uids):
            kw["lora_uids"] = [u if u is not None else "-1" for u in uids]
        return {k: v for k, v in kw.items() if k not in self._generate_dropped}

    def _lora_uid(self, req: GenerationRequest) -> str | None:
        uid = req.extra.get("lora_task_uid", self.options.lora_task_uid)
        return None if uid is None else str(uid)  # the runner indexes its weights by *string* uid

    def _check_request(self, req: GenerationRequest) -> str | None:
        """Never truncate: a request the runtime would reject or cut becomes an error row."""
        p, g = len(req.prompt_ids), req.max_new_tokens
        if p == 0:
            return "empty prompt"
        if p > self.max_input_len:
            return f"prompt {p} tokens > runtime max_input_len {self.max_input_len}"
        if g > self.max_output_len or p + g > self.max_input_len + self.max_output_len:
            return (f"prompt {p} + max_new_tokens {g} exceeds the runtime limits "
                    f"(max_input_len {self.max_input_len}, max_output_len {self.max_output_len})")
        if self._lora_uid(req) not in (None, "-1") and not self.engine.lora_plugin:
            return "lora_task_uid given but the engine was built without lora_plugin"
        return None

    def generate(self, batch: Sequence[GenerationRequest]) -> list[GenerationResult]:
        results: list[GenerationResult | None] = [None] * len(batch)
        runnable: dict[int, list[int]] = {}
        for i, req in enumerate(batch):
            err = self._check_request(req)
            if err:
                results[i] = GenerationResult(text=None, n_prompt_tokens=len(req.prompt_ids), error=err)
            else:
                # One generate call per max_new_tokens: the budget is per call, and a longer one inflates latency.
                runnable.setdefault(req.max_new_tokens, []).append(i)
        size = max(1, self.options.max_batch_size)
        for idx in runnable.values():
            for start in range(0, len(idx), size):
                group = idx[start:start + size]
                for i, res in zip(group, self._run_group([batch[i] for i in group])):
                    results[i] = res
        done = [r for r in results if r is not None]
        assert len(done) == len(batch), "every request gets exactly one result"
        return done

    def _run_group(self, reqs: list[GenerationRequest]) -> list[GenerationResult]:
        import torch

        ids = [torch.tensor(r.prompt_ids, dtype=torch.int32) for r in reqs]
        kwargs = self._generate_kwargs(reqs)
        ttft: list[float | None] = [None] * len(reqs)
        t0 = time.perf_counter()
        try:
            out = self._runner.generate(ids, **kwargs)
            if self.is_leader and kwargs.get("streaming"):
                out = self._consume_stream(out, reqs, t0, ttft)
            synchronize(torch)
        except Exception as exc:
            if is_fatal(exc):
                raise
            msg = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
            return [GenerationResult(text=None, n_prompt_tokens=len(r.prompt_ids), batch_size=len(reqs), error=msg)
                    for r in reqs]
        latency = time.perf_counter() - t0
        if not self.is_leader:
            # Leader mode: this rank got nothing back ([] in 1.x) and must not look at it.
            return [GenerationResult(text=None, n_prompt_tokens=len(r.prompt_ids), batch_size=len(reqs)) for r in reqs]
        return [self._decode(out, b, r, latency, ttft[b], len(reqs)) for b, r in enumerate(reqs)]

    @staticmethod
    def _consume_stream(stream: Any, reqs: list[GenerationRequest], t0: float, ttft: list[float | None]) -> Any:
        last = None
        for part in stream:
            now = time.perf_counter() - t0
            lengths = part["sequence_lengths"]
            for b, r in enumerate(reqs):
                if ttft[b] is None and int(lengths[b][0]) > len(r.prompt_ids):
                    ttft[b] = now
            last = part
        if last is None:
            raise RuntimeError("streaming generate yielded nothing")
        return last

    def _decode(self, out: Any, b: int, req: GenerationRequest, latency: float, ttft: float | None,
                batch_size: int) -> GenerationResult:
        p = len(req.prompt_ids)
        # output_ids [batch, beams, max_seq_len] holds the prompt and is padded with end_id: slice by length.
        end = int(out["sequence_lengths"][b][0])
        row = out["output_ids"][b][0]
        if end < p or int(row[p - 1]) != req.prompt_ids[-1]:
            return GenerationResult(text=None, n_prompt_tokens=p, latency_s=latency, batch_size=batch_size,
                                    error="output_ids do not start with the prompt: unexpected tensorrt_llm output")
        gen = [int(t) for t in row[p:end].tolist()]
        finish = "length" if len(gen) >= req.max_new_tokens else "stop"
        if gen and gen[-1] == self.end_id:
            gen, finish = gen[:-1], "stop"
        return GenerationResult(text=self.tokenizer.decode(gen), n_prompt_tokens=p, n_output_tokens=len(gen),
                                latency_s=latency, ttft_s=ttft, batch_size=batch_size, finish_reason=finish)

    # ----------------------------------------------------------------------------------------------- records
    def runtime_columns(self) -> dict[str, Any]:
        """``runtime_*`` columns: what was passed to from_dir; None where the installed release lacked it."""
        kw, o = self.runner_kwargs, self.options
        window = kw.get("max_attention_window_size")
        return {
            "runtime_max_input_len": kw.get("max_input_len"),
            "runtime_max_output_len": kw.get("max_output_len"),
            "runtime_max_batch_size": kw.get("max_batch_size"),
            "runtime_enable_chunked_context": kw.get("enable_chunked_context"),
            "runtime_max_tokens_in_paged_kv_cache": kw.get("max_tokens_in_paged_kv_cache"),
            "runtime_kv_cache_free_gpu_memory_fraction": kw.get("kv_cache_free_gpu_memory_fraction"),
            "runtime_kv_cache_enable_block_reuse": kw.get("kv_cache_enable_block_reuse"),
            "runtime_multi_block_mode": kw.get("multi_block_mode"),
            "runtime_enable_context_fmha_fp32_acc": kw.get("enable_context_fmha_fp32_acc"),
            "runtime_max_attention_window_size": window[0] if window else None,
            "runtime_fail_fast_on_attention_window": kw.get("fail_fast_on_attention_window_too_large"),
            "runtime_lora_dir": ",".join(kw.get("lora_dir") or []) or None,
            "runtime_world_size": self.engine.world_size,
            "runtime_replicas": self.replicas,
            "runtime_streaming_ttft": o.streaming_ttft and "streaming" not in self._generate_dropped,
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
            "from_dir_kwargs": dict(self.runner_kwargs),
            "dropped_kwargs": {"from_dir": list(self.dropped), "generate": list(self._generate_dropped)},
            "end_id": self.end_id,
            "pad_id": self.pad_id,
        }

    def row_columns(self) -> dict[str, Any]:
        return {"backend": self.name, "tensorrt_llm_version": self.version, **self.engine.to_columns(),
                **self.runtime_columns()}

    def close(self) -> None:
        # The executor shuts down when the runner is collected; every rank drops it at the same point.
        self._runner = None

