"""Stand-in for tensorrt_llm.bindings.executor: names and keywords of the 1.2 nanobind bindings, real checks."""

from __future__ import annotations

import itertools
import os
import time
from datetime import timedelta
from enum import Enum
from pathlib import Path

from tensorrt_llm import _standin as S


TERMINATE_TAG = 4242


class ModelType(Enum):
    DECODER_ONLY = 0
    ENCODER_DECODER = 1


class CommunicationType(Enum):
    MPI = 0


class CommunicationMode(Enum):
    LEADER = 0
    ORCHESTRATOR = 1


class FinishReason(Enum):
    NOT_FINISHED = 0
    END_ID = 1
    STOP_WORDS = 2
    LENGTH = 3
    TIMED_OUT = 4
    CANCELLED = 5


class _Field:
    """A bound field (nanobind ``def_prop_rw``): a data descriptor on the class, which is how evalctx tells a field a
    release has from one it lacks."""

    def __init__(self, name):
        self.name = name

    def __get__(self, obj, cls=None):
        return self if obj is None else obj._values[self.name]

    def __set__(self, obj, value):
        obj._values[self.name] = value


class _Bound:
    """A bound C++ class: its keywords and properties are a fixed set (nanobind raises on an unknown keyword). A
    class bound with ``nb::dynamic_attr()`` (``DYNAMIC_ATTR``: ExecutorConfig in executorConfig.cpp) also takes any
    other attribute, into the instance ``__dict__``, where the C++ side never sees it; the others raise."""

    FIELDS: dict = {}
    DYNAMIC_ATTR = False

    @classmethod
    def _sync(cls) -> None:
        """The class's properties are its FIELDS minus those DROPPED (an older release binds fewer)."""
        for name in cls.FIELDS:
            dropped = f"{cls.__name__}.{name}" in S.DROPPED
            present = isinstance(cls.__dict__.get(name), _Field)
            if dropped and present:
                delattr(cls, name)
            elif not dropped and not present:
                setattr(cls, name, _Field(name))

    def __init__(self, **kwargs):
        type(self)._sync()
        object.__setattr__(self, "_values", {})
        fields = self._fields()
        for name, default in fields.items():
            self._values[name] = default() if callable(default) else default
        for name, value in kwargs.items():
            if name not in fields:
                raise TypeError(f"{type(self).__name__}.__init__(): incompatible function arguments ({name}=...)")
            self._values[name] = value

    @classmethod
    def _fields(cls) -> dict:
        return {k: v for k, v in cls.FIELDS.items() if f"{cls.__name__}.{k}" not in S.DROPPED}

    def field(self, name, default=None):
        """What the C++ side sees: the bound field's value; a dynamic attribute of the same name is not it."""
        return self._values.get(name, default) if name in self._fields() else default

    def __setattr__(self, name, value):
        if name not in self._fields() and not self.DYNAMIC_ATTR:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")
        object.__setattr__(self, name, value)


class KvCacheConfig(_Bound):
    # enable_block_reuse defaults to true in the bindings (executorConfig.cpp), unlike ModelRunnerCpp.from_dir's
    # kv_cache_enable_block_reuse=False: a caller that leaves it out gets reuse.
    FIELDS = dict(enable_block_reuse=True, max_tokens=None, max_attention_window=None, sink_token_length=None,
                  free_gpu_memory_fraction=None, host_cache_size=None, onboard_blocks=True,
                  cross_kv_cache_fraction=None, runtime_defaults=None)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        defaults = kwargs.get("runtime_defaults")
        if defaults is not None:  # KvCacheConfig::fillEmptyFieldsFromRuntimeDefaults: only fields left unset
            if self.max_attention_window is None and getattr(defaults, "max_attention_window", None):
                self.max_attention_window = list(defaults.max_attention_window)
            if self.sink_token_length is None and getattr(defaults, "sink_token_length", None) is not None:
                self.sink_token_length = defaults.sink_token_length


class ExtendedRuntimePerfKnobConfig(_Bound):
    FIELDS = dict(multi_block_mode=True, enable_context_fmha_fp32_acc=False, cuda_graph_mode=False,
                  cuda_graph_cache_size=0)


class PeftCacheConfig(_Bound):
    FIELDS = dict(num_host_module_layer=0, num_device_module_layer=0)


class ParallelConfig(_Bound):
    FIELDS = dict(communication_type=CommunicationType.MPI, communication_mode=CommunicationMode.LEADER,
                  device_ids=None, participant_ids=None, orchestrator_config=None, num_nodes=None)

    def __init__(self, communication_type=CommunicationType.MPI, communication_mode=CommunicationMode.LEADER,
                 **kwargs):
        super().__init__(communication_type=communication_type, communication_mode=communication_mode, **kwargs)


class ExecutorConfig(_Bound):
    DYNAMIC_ATTR = True  # nb::class_<tle::ExecutorConfig>(m, "ExecutorConfig", nb::dynamic_attr())
    FIELDS = dict(max_beam_width=1, max_batch_size=None, max_num_tokens=None, kv_cache_config=KvCacheConfig,
                  enable_chunked_context=False, parallel_config=None, peft_cache_config=None,
                  extended_runtime_perf_knob_config=None, gather_generation_logits=False,
                  fail_fast_on_attention_window_too_large=False)


class OutputConfig(_Bound):
    FIELDS = dict(return_log_probs=False, return_context_logits=False, return_generation_logits=False,
                  exclude_input_from_output=False, return_encoder_output=False, return_perf_metrics=False,
                  additional_model_outputs=None)


class SamplingConfig(_Bound):
    FIELDS = dict(beam_width=1, top_k=None, top_p=None, temperature=None, seed=None, min_tokens=None,
                  repetition_penalty=None)

    def __init__(self, beam_width=1, **kwargs):
        super().__init__(beam_width=beam_width, **kwargs)


class LoraConfig(_Bound):
    FIELDS = dict(task_id=None, weights=None, config=None)


class Request:
    KEYWORDS = ("streaming", "sampling_config", "output_config", "end_id", "pad_id", "position_ids", "bad_words",
                "stop_words", "lora_config", "client_id", "return_all_generated_tokens")

    def __init__(self, input_token_ids, max_tokens, **kwargs):
        unknown = set(kwargs) - set(self.KEYWORDS)
        if unknown or not isinstance(input_token_ids, list) or not all(isinstance(t, int) for t in input_token_ids):
            raise TypeError(f"Request.__init__(): incompatible function arguments {sorted(unknown)}")
        if not isinstance(max_tokens, int):
            raise TypeError("Request.__init__(): max_tokens must be an int")
        stop = kwargs.get("stop_words")
        if stop is not None and not all(isinstance(w, list) and all(isinstance(t, int) for t in w) for w in stop):
            raise TypeError("Request.__init__(): stop_words must be a list of token-id lists")
        self.input_token_ids, self.max_tokens = input_token_ids, max_tokens
        self.streaming = kwargs.get("streaming", False)
        self.sampling_config = kwargs.get("sampling_config") or SamplingConfig()
        self.output_config = kwargs.get("output_config") or OutputConfig()
        self.end_id, self.pad_id = kwargs.get("end_id"), kwargs.get("pad_id")
        self.stop_words, self.lora_config = stop, kwargs.get("lora_config")


class TimingMetrics(_Bound):
    FIELDS = dict(arrival_time=timedelta(0), first_scheduled_time=timedelta(0), first_token_time=timedelta(0),
                  last_token_time=timedelta(0))


class KvCacheMetrics(_Bound):
    FIELDS = dict(num_total_allocated_blocks=0, num_new_allocated_blocks=0, num_reused_blocks=0, num_missed_blocks=0,
                  kv_cache_hit_rate=0.0)


class RequestPerfMetrics(_Bound):
    FIELDS = dict(timing_metrics=TimingMetrics, kv_cache_metrics=KvCacheMetrics, first_iter=None, last_iter=None,
                  iter=None)


class Result(_Bound):
    FIELDS = dict(is_final=False, output_token_ids=list, finish_reasons=list, sequence_index=0,
                  is_sequence_final=False, decoding_iter=0, request_perf_metrics=None)


class Response:
    def __init__(self, request_id, result=None, error_msg=None):
        self.request_id, self._result, self._error = request_id, result, error_msg

    def has_error(self):
        return self._error is not None

    @property
    def error_msg(self):
        if self._error is None:
            S.fail("Cannot get the error message for a response without error")
        return self._error

    @property
    def result(self):
        if self._error is not None:  # getResult() throws on an error response
            S.fail("Cannot get the result for a response with an error")
        return self._result


def _session_order(ids, tp, pp):
    """executorImpl.cpp: reverse the ids for pp > 1, then restore the order inside each tp group."""
    ids = list(ids)
    if pp > 1:
        ids.reverse()
        if tp > 1:
            ids = [i for s in range(0, len(ids), tp) for i in reversed(ids[s:s + tp])]
    return ids


class Executor:
    def __init__(self, model_path, model_type, executor_config):
        if not isinstance(model_path, (str, Path)) or not isinstance(model_type, ModelType) \
                or not isinstance(executor_config, ExecutorConfig):
            raise TypeError("Executor.__init__(): incompatible function arguments")
        e = S.engine_limits(model_path)
        self.config, self.engine = executor_config, e
        n = e["tp"] * e["pp"] * e["cp"]
        rank, size, comm = S.mpi_world()
        parallel = executor_config.field("parallel_config") or ParallelConfig()
        ids = parallel.participant_ids
        if ids is None:
            if size != n:
                S.fail("With communicationMode kLEADER, MPI worldSize is expected to be equal to tp*pp*cp when "
                       "participantIds are not specified")
            ids = list(range(n))
        elif len(ids) != n:
            S.fail(f"When specifying participantIds, participantIds size ({len(ids)}) must be equal to tp*pp*cp")
        devices = parallel.device_ids
        if devices is not None:
            if len(devices) != n:
                S.fail("When specifying deviceIds, deviceIds size must be equal to tp*pp*cp")
            if len(set(devices)) != len(devices) or max(devices) >= e["gpus_per_node"] or min(devices) < 0:
                S.fail(f"Device IDs {devices} must be unique and below gpus_per_node {e['gpus_per_node']}")
        self.is_worker, self.is_leader = rank in ids, rank == ids[0]
        order = _session_order(ids, e["tp"], e["pp"])
        self.session = None
        if comm is not None and parallel.participant_ids is not None and self.is_worker:
            # A real collective over exactly these world ranks: a rank missing here would hang the others.
            self.session = comm.Create_group(comm.Get_group().Incl(order), tag=1000 + ids[0])
            session_rank = self.session.Get_rank()
        else:
            session_rank = order.index(rank) if self.is_worker else None
        if self.is_worker:
            engine_file = Path(model_path) / f"rank{session_rank}.engine"
            if not engine_file.is_file():
                S.fail(f"engine file {engine_file} not found")
        self.device = None if session_rank is None else (
            devices[session_rank % len(devices)] if devices else session_rank % e["gpus_per_node"])
        self.chunked = executor_config.field("enable_chunked_context", False)
        if self.chunked and not e["paged_context_fmha"]:
            S.warn("Chunked context is not supported for this configuration and will be disabled.")
            self.chunked = False
        seq = e["max_seq_len"]
        if self.chunked:
            self.max_input_len = seq - 1
        elif e["context_fmha"] and e["packed"]:
            self.max_input_len = min(seq - 1, e["max_num_tokens"])
        else:
            self.max_input_len = e["max_input_len"]
        kv = executor_config.kv_cache_config
        windows = kv.max_attention_window or [seq]
        self.attention_window = max(min(w, seq) for w in windows)
        if kv.max_tokens is not None and kv.max_tokens < self.attention_window:
            if executor_config.field("fail_fast_on_attention_window_too_large", False):
                S.fail("Attention window too large to fit even a single sequence in the KV cache")
            self.attention_window = kv.max_tokens  # shrunk silently, as the runtime does without fail-fast
        self._ids = itertools.count(1)
        self._queue, self._hung, self._done, self._shutdown, self._wedged = [], {}, set(), False, False
        self._leader_session_rank = order.index(ids[0]) if self.is_worker else None
        S.place_log(dict(world_rank=rank, local_rank=os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK"),
                         session_rank=session_rank, device=self.device,
                         participants=parallel.participant_ids, device_ids=devices, leader=self.is_leader))

    def can_enqueue_requests(self):
        return self.is_leader

    def _check(self):
        if self._shutdown:
            S.fail("Shutdown called")
        if not self.is_leader:
            S.fail("With LEADER mode, only the leader can call the executor API")

    def enqueue_requests(self, requests):
        self._check()
        return [self._enqueue(r) for r in requests]

    def enqueue_request(self, request):
        return self.enqueue_requests([request])[0]

    def _enqueue(self, req):
        if not isinstance(req, Request):
            raise TypeError("enqueue_requests(): incompatible function arguments")
        rid = next(self._ids)
        prompt, seq = req.input_token_ids, self.engine["max_seq_len"]
        if len(prompt) > self.max_input_len:
            self._queue.append(Response(rid, error_msg=f"Prompt length ({len(prompt)}) exceeds maximum input length "
                                                       f"({self.max_input_len})."))
            return rid
        max_tokens = req.max_tokens
        if len(prompt) + max_tokens > seq:
            max_tokens = seq - len(prompt)
            S.warn(f"Number of requested output tokens is changed to ({max_tokens}).")
        if S.BEHAVIOUR["error_token"] in prompt:
            self._queue.append(Response(rid, error_msg=S.BEHAVIOUR["error_message"]))
        elif S.BEHAVIOUR["hang_token"] in prompt:
            self._hung[rid] = req
        else:
            tokens, reason = S.generate(prompt, max_tokens, req.end_id, req.stop_words)
            self._respond(rid, req, tokens, reason)
        return rid

    def _respond(self, rid, req, tokens, reason):
        oc = req.output_config
        perf = None
        if oc.field("return_perf_metrics", False):
            perf = RequestPerfMetrics(timing_metrics=TimingMetrics(**S.perf_times(rid, len(req.input_token_ids),
                                                                                  len(tokens))),
                                      kv_cache_metrics=KvCacheMetrics(num_reused_blocks=S.BEHAVIOUR["reused_blocks"]))
        final = dict(is_final=True, finish_reasons=[FinishReason[reason]], is_sequence_final=True,
                     request_perf_metrics=perf)
        if req.streaming:  # one new token per response; the prompt never comes back
            steps = tokens or [None]
            for i, tok in enumerate(steps):
                last = i == len(steps) - 1
                ids = [[tok]] if tok is not None else [[]]
                self._queue.append(Response(rid, Result(output_token_ids=ids, **(final if last else {}))))
        else:
            out = tokens if oc.field("exclude_input_from_output", False) else [*req.input_token_ids, *tokens]
            self._queue.append(Response(rid, Result(output_token_ids=[out], **final)))
        self._done.add(rid)

    def await_responses(self, timeout=None):
        self._check()
        if timeout is not None and not isinstance(timeout, timedelta):
            raise TypeError("await_responses(): timeout must be a datetime.timedelta")
        if self._queue:
            out, self._queue = self._queue, []
            return out
        if timeout is None:
            raise AssertionError("await_responses() without a timeout would block forever here")
        time.sleep(min(timeout.total_seconds(), 0.02))
        return []

    def cancel_request(self, id):
        self._check()
        if S.BEHAVIOUR["cancel_lost"] and id in self._hung:
            self._wedged = True  # the request never ends: the execution thread is stuck
            return
        req = self._hung.pop(id, None)
        if req is not None:
            self._queue.append(Response(id, Result(is_final=True, output_token_ids=[[]],
                                                   finish_reasons=[FinishReason.CANCELLED])))
            self._done.add(id)

    def shutdown(self):
        """executorImpl.cpp: the leader enqueues a terminate request (its execution thread passes it on to the
        followers' execution threads, without the followers' main threads) and joins its execution thread; a
        follower joins its execution thread, which ends when that terminate arrives. A wedged execution thread (a
        cancellation never answered: stuck in a kernel or a collective) never ends, so join() would block forever."""
        if self._shutdown:
            return
        self._shutdown = True
        if self._wedged:
            raise AssertionError("Executor.shutdown() would block forever here: its execution thread is stuck")
        if self.session is None:
            return
        if self.is_leader:
            leader = self.session.Get_rank()
            self._terminate = [self.session.isend(True, dest=r, tag=TERMINATE_TAG)
                               for r in range(self.session.Get_size()) if r != leader]
        else:
            self.session.recv(source=self._leader_session_rank, tag=TERMINATE_TAG)
