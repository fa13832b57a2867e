"""TensorRT-LLM's C++ executor (``tensorrt_llm.bindings.executor``) driven directly, without ModelRunnerCpp.

Why not ``ModelRunnerCpp`` (``tensorrt_llm/runtime/model_runner_cpp.py``, read at commit 03832911 and in a later
version that adds ``fail_fast_on_attention_window_too_large``):

* ``from_dir`` builds ``ParallelConfig(MPI, LEADER, device_ids=...)`` without participant ids, so several
  replicas in one ``mpirun`` fail the executor's world-size check (see :mod:`.launch`);
* ``generate`` builds its own ``OutputConfig`` (no perf metrics, the prompt copied into every output) and, when
  streaming, deep-copies the prompt into its output on the first step and deep-copies, pads to max_seq_len and
  moves to the GPU on every step: seconds of host work per step at 1M tokens, inside any host-side TTFT;
* its await loop reads ``response.result.is_final`` before ``has_error()`` (``getResult()`` throws on an error
  response), so one request's error aborts the loop and the batch's other request ids stay in the executor;
* it takes one ``end_id`` per request.

Here every request gets ``OutputConfig(exclude_input_from_output=True, return_perf_metrics=True)`` and
``end_id`` plus ``stop_words`` for further end ids; the await loop checks ``has_error()`` first, keeps waiting for
the other requests, and cancels what has not finished by a deadline, so a batch always ends with one outcome per
request and nothing left behind. Binding names are those of ``cpp/tensorrt_llm/nanobind/executor/*.cpp``
(request.cpp, executor.cpp, executorConfig.cpp as indexed); features a release lacks are detected by attribute,
dropped and reported, never guessed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Sequence

from evalctx.backends.trtllm.launch import Placement
from evalctx.backends.trtllm.outputs import one_line
from evalctx.capacity.engine_config import EngineConfig
from evalctx.errors import UsageError

log = logging.getLogger("evalctx.backends.trtllm")

POLL_S = 1.0
"""How long one ``await_responses`` call may block: the deadline is checked between calls."""
CANCEL_GRACE_S = 60.0
"""After cancelling, how long to wait for the cancelled requests' final responses before giving up on the run."""


@dataclass
class Outcome:
    """What came back for one request."""

    tokens: list[int] = field(default_factory=list)
    """Generated token ids (the prompt excluded)."""
    finish: str | None = None
    """The executor's ``FinishReason`` name: END_ID, STOP_WORDS, LENGTH, CANCELLED, ..."""
    error: str | None = None
    """One line; set for error responses and for requests cancelled at the deadline."""
    perf: Any = None
    """``RequestPerfMetrics`` of the final response, when the release and the OutputConfig give them."""
    host_first_token_s: float | None = None
    """Host seconds from enqueue to the first response carrying tokens (meaningful when streaming)."""
    host_latency_s: float | None = None
    """Host seconds from enqueue to the final response."""


def import_bindings() -> Any:
    """``tensorrt_llm.bindings.executor``; a missing or broken install is a one-line UsageError."""
    try:
        from tensorrt_llm.bindings import executor as trt
    except ImportError as exc:
        raise UsageError(f"tensorrt_llm's C++ bindings cannot be imported ({exc}): pip install 'evalctx[trtllm]' "
                         "(the NVIDIA wheel, with its CUDA libraries)") from None
    return trt


def has_field(obj: Any, name: str) -> bool:
    """Whether ``obj``'s class binds ``name`` as a settable property (a data descriptor on the type).

    ``hasattr`` on an instance cannot tell: ``ExecutorConfig`` is bound with ``nb::dynamic_attr()``
    (cpp/tensorrt_llm/nanobind/executor/executorConfig.cpp), so setting a field a release lacks succeeds, lands in
    the instance ``__dict__`` and is ignored by the C++ side. The fields it does have are ``def_prop_rw`` properties
    of the class (pybind11's ``def_property``/``def_readwrite`` in older releases), which is what is looked up here.
    """
    import inspect

    descriptor = inspect.getattr_static(type(obj), name, None)
    return descriptor is not None and hasattr(descriptor, "__set__")


def set_optional(obj: Any, name: str, value: Any, dropped: list[str], where: str) -> bool:
    """Set the bound field ``obj.name``; a release whose class lacks it gets it listed in ``dropped`` instead (never
    set as a dynamic attribute, which the runtime would ignore). Returns whether it was set."""
    if not has_field(obj, name):
        dropped.append(f"{where}.{name}")
        return False
    try:
        setattr(obj, name, value)
    except (AttributeError, TypeError):
        dropped.append(f"{where}.{name}")
        return False
    return True


def kv_cache_config(trt: Any, *, fraction: float, block_reuse: bool, max_tokens: int | None, window: int | None,
                    sink_tokens: int | None, runtime_defaults: Any, dropped: list[str]) -> Any:
    """``KvCacheConfig`` with the keywords ``ModelRunnerCpp.from_dir`` passes (None = the runtime default).

    ``runtime_defaults`` (the engine's own window and sink defaults, ``GptJsonConfig.runtime_defaults``) is what
    from_dir passes by default; a release whose KvCacheConfig lacks the keyword gets it dropped and reported.
    """
    kw: dict[str, Any] = dict(free_gpu_memory_fraction=fraction, enable_block_reuse=block_reuse)
    optional = {"max_tokens": max_tokens, "max_attention_window": [window] if window else None,
                "sink_token_length": sink_tokens, "runtime_defaults": runtime_defaults}
    kw.update({k: v for k, v in optional.items() if v is not None})
    try:
        return trt.KvCacheConfig(**kw)
    except TypeError:
        if "runtime_defaults" not in kw:
            raise
        dropped.append("KvCacheConfig.runtime_defaults")
        del kw["runtime_defaults"]
        return trt.KvCacheConfig(**kw)


def parallel_config(trt: Any, placement: Placement) -> Any:
    """Leader mode over MPI; participant and device ids only where :func:`.launch.place` set them."""
    kw = {k: v for k, v in (("device_ids", placement.device_ids), ("participant_ids", placement.participant_ids))
          if v is not None}
    try:
        return trt.ParallelConfig(trt.CommunicationType.MPI, trt.CommunicationMode.LEADER, **kw)
    except TypeError:
        raise UsageError(f"this tensorrt_llm's ParallelConfig takes no {' or '.join(kw)}: run one replica per mpirun "
                         "(mpirun -n tp*pp*cp) or install tensorrt_llm >= 1.2") from None


WINDOW_ADVICE = ("the KV cache cannot hold one sequence of the attention window (max_seq_len unless "
                 "max_attention_window_size is set): raise max_tokens_in_paged_kv_cache or "
                 "kv_cache_free_gpu_memory_fraction, or pass max_attention_window_size=<longest prompt + max_new_tokens>, "
                 "or set fail_fast_on_attention_window_too_large=false together with max_tokens_in_paged_kv_cache "
                 "(preflight then refuses what the cache cannot hold)")


def build_executor(trt: Any, engine: EngineConfig, config: Any) -> Any:
    """Load the engine on this rank (every rank of the replica calls it together).

    The executor's own refusals at load (TensorRT-LLM raises them as RuntimeError: the KV cache too small for the
    attention window under fail-fast, an engine built for another version or GPU, out of memory) are the settings'
    fault, not a bug: they become a one-line UsageError saying what failed, with advice where it is known.
    """
    try:
        return trt.Executor(Path(engine.path), trt.ModelType.DECODER_ONLY, config)
    except RuntimeError as exc:
        message = one_line(str(exc))
        advice = f"; {WINDOW_ADVICE}" if "attention window" in message.lower() else ""
        raise UsageError(f"tensorrt_llm could not load engine {engine.path}: {message}{advice}") from None


def output_config(trt: Any, dropped: list[str]) -> tuple[Any, bool, bool]:
    """``OutputConfig`` asking for generated tokens only and the executor's timers.

    Returns (config, input excluded, perf metrics on); a release lacking either is handled by the caller.
    """
    oc = trt.OutputConfig()
    excluded = set_optional(oc, "exclude_input_from_output", True, dropped, "OutputConfig")
    perf = set_optional(oc, "return_perf_metrics", True, dropped, "OutputConfig")
    return oc, excluded, perf


def make_request(trt: Any, prompt_ids: Sequence[int], max_tokens: int, *, end_ids: Sequence[int], pad_id: int,
                 sampling: Any, output: Any, streaming: bool, lora: Any = None) -> Any:
    """One ``Request``: the first end id as ``end_id``, the others as one-token stop words (the executor takes one
    end id per request; ``stop_words`` is its list of token sequences that also end generation)."""
    kw: dict[str, Any] = dict(streaming=streaming, sampling_config=sampling, output_config=output,
                              end_id=int(end_ids[0]), pad_id=int(pad_id))
    if len(end_ids) > 1:
        kw["stop_words"] = [[int(e)] for e in end_ids[1:]]
    if lora is not None:
        kw["lora_config"] = lora
    return trt.Request(list(prompt_ids), int(max_tokens), **kw)


def collect(executor: Any, ids: Sequence[int], *, t0: float, timeout_s: float | None, streaming: bool,
            poll_s: float = POLL_S) -> dict[int, Outcome]:
    """Wait for the final response of every id in ``ids``; one :class:`Outcome` each, none left in the executor.

    ``has_error()`` is read before ``result`` (which throws on an error response); an error ends only its own
    request. Requests without a final response ``timeout_s`` after ``t0`` are cancelled and become errors; if the
    executor does not end them within :data:`CANCEL_GRACE_S` either, RuntimeError ends the run rather than hang.
    Responses for ids not in ``ids`` (late ones of an earlier batch) are ignored.
    """
    outcomes = {i: Outcome() for i in ids}
    open_ids = set(ids)
    deadline = None if timeout_s is None else t0 + timeout_s
    cancelled = False
    while open_ids:
        now = time.perf_counter()
        if deadline is not None and now >= deadline:
            if cancelled:
                raise RuntimeError(f"tensorrt_llm: cancelled requests {sorted(open_ids)} got no final response within "
                                   f"{CANCEL_GRACE_S:g} s; the executor's state is unknown")
            for rid in open_ids:
                executor.cancel_request(rid)
                outcomes[rid].error = f"no final response within request_timeout_s={timeout_s:g} s: cancelled"
            cancelled, deadline = True, now + CANCEL_GRACE_S
            continue
        wait = poll_s if deadline is None else max(0.0, min(poll_s, deadline - now))
        for resp in executor.await_responses(timeout=timedelta(seconds=wait)):
            rid = resp.request_id
            if rid not in open_ids:
                log.debug("ignoring a response for request %s, not in this batch", rid)
                continue
            out = outcomes[rid]
            if resp.has_error():
                out.error = out.error or one_line(str(resp.error_msg))
                out.host_latency_s = time.perf_counter() - t0
                open_ids.discard(rid)
                continue
            result = resp.result
            tokens = [int(t) for t in (result.output_token_ids[0] if result.output_token_ids else [])]
            if streaming:
                out.tokens.extend(tokens)
            else:
                out.tokens = tokens
            if tokens and out.host_first_token_s is None:
                out.host_first_token_s = time.perf_counter() - t0
            if result.is_final:
                reasons = list(getattr(result, "finish_reasons", None) or [])
                out.finish = getattr(reasons[0], "name", str(reasons[0])) if reasons else None
                out.perf = getattr(result, "request_perf_metrics", None)
                out.host_latency_s = time.perf_counter() - t0
                open_ids.discard(rid)
    return outcomes
