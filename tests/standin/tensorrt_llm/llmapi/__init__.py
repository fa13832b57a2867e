"""Stand-in for the PyTorch-backend LLM API (tensorrt_llm.LLM, SamplingParams, llmapi.KvCacheConfig).

Follows tensorrt_llm/llmapi/llm.py as indexed: generate_async() checks the prompt against max_num_tokens when
chunked prefill is off (``_check_arguments``, raised at submission), returns a RequestOutput whose ``result()``
waits (raising on an error) and whose ``outputs[0]`` carries generated ``token_ids`` only, the finish reason and
the executor's ``request_perf_metrics``; stop tokens are stripped as result.py strips them. A stuck request's
``result(timeout)`` blocks until ``abort()`` whatever the timeout, as the newest result.py does
(``BEHAVIOUR["result_timeout"]`` = "honoured" acts as older releases, which raise ``queue.Empty``).
"""

from __future__ import annotations

import itertools
import json
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from tensorrt_llm import _standin as S
from tensorrt_llm.bindings import executor as trt
from tensorrt_llm.llmapi.llm_args import TorchLlmArgs

CALLS: list = []


class RequestError(RuntimeError):
    pass


class KvCacheConfig:
    FIELDS = dict(enable_block_reuse=True, max_tokens=None, max_attention_window=None, sink_token_length=None,
                  free_gpu_memory_fraction=0.9, dtype="auto", tokens_per_block=32, enable_partial_reuse=True)

    def __init__(self, **kwargs):
        extra = set(kwargs) - set(self.FIELDS)
        if extra:  # pydantic extra="forbid"
            raise ValueError(f"1 validation error for KvCacheConfig\n{sorted(extra)[0]}\n"
                             "  Extra inputs are not permitted")
        for k, v in {**self.FIELDS, **kwargs}.items():
            setattr(self, k, v)


@dataclass
class SamplingParams:
    end_id: int | None = None
    pad_id: int | None = None
    max_tokens: int = 32
    stop: list | None = None
    stop_token_ids: list | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    return_perf_metrics: bool = False
    detokenize: bool = True
    include_stop_str_in_output: bool = False


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | None = None
    request_perf_metrics: object = None


class RequestOutput:
    def __init__(self, rid, prompt_ids, error=None, hung=False):
        self.request_id, self.prompt_token_ids = rid, prompt_ids
        self.outputs = [CompletionOutput(0)]
        self.finished, self._error, self._hung = not hung, error, hung
        self._ended = threading.Event()  # the final response of a stuck request (after abort)
        if not hung:
            self._ended.set()

    def result(self, timeout=None):
        if S.BEHAVIOUR["result_timeout"] == "honoured" and timeout is not None:
            if not self._ended.wait(timeout):
                raise queue.Empty()  # older result.py: _result_step's self.queue.get(timeout=timeout)
        elif not self._ended.wait(S.BEHAVIOUR["block_cap_s"]):  # newest result.py: self.queue.get(), no timeout
            raise AssertionError("result() would block forever here: nothing ended this request")
        if self._error:
            raise RequestError(self._error)
        return self

    def abort(self):
        if self._hung and not S.BEHAVIOUR["abort_lost"]:
            self._hung, self.finished = False, True
            self.outputs[0].finish_reason = "cancelled"
            self._ended.set()


class LLM:
    def __init__(self, model, tokenizer=None, **kwargs):
        extra = set(kwargs) - set(TorchLlmArgs.model_fields)
        if extra:
            raise ValueError(f"1 validation error for TorchLlmArgs\n{sorted(extra)[0]}\n"
                             "  Extra inputs are not permitted")
        cfg_file = Path(model) / "config.json"
        if not cfg_file.is_file():
            raise ValueError(f"{model} is not a Hugging Face checkpoint folder")
        hf = json.loads(cfg_file.read_text())
        CALLS.append(dict(model=model, tokenizer=tokenizer, **kwargs))
        self.args = SimpleNamespace(
            max_seq_len=kwargs.get("max_seq_len") or hf.get("max_position_embeddings"),
            max_num_tokens=kwargs.get("max_num_tokens", 8192),
            max_batch_size=kwargs.get("max_batch_size", 2048),
            enable_chunked_prefill=kwargs.get("enable_chunked_prefill", False),
            kv_cache_config=kwargs.get("kv_cache_config") or KvCacheConfig(),
            tensor_parallel_size=kwargs.get("tensor_parallel_size", 1), backend="pytorch")
        self._ids = itertools.count(1)
        self._shutdown = False
        kv = self.args.kv_cache_config
        tpb = kv.tokens_per_block
        windows = _windows(hf, self.args.max_seq_len)
        if len(windows) == 1:  # one window size: one pool, min(memory, max_tokens)
            pool = min(S.BEHAVIOUR["kv_pool_tokens"], kv.max_tokens or S.BEHAVIOUR["kv_pool_tokens"])
            self.window_blocks = {next(iter(windows)): pool // tpb}  # whole blocks, as the manager allocates them
        else:
            # VSWA (resource_manager.py calculate_max_num_blocks_for_vswa): the memory is split between one pool per
            # window size in proportion to layers x window, and kv_cache_config.max_tokens is ignored. The memory is
            # what would hold kv_pool_tokens tokens in every layer.
            layers = sum(windows.values())
            weight = sum(w * n for w, n in windows.items())
            self.window_blocks = {w: S.BEHAVIOUR["kv_pool_tokens"] * layers * w // weight // tpb for w in windows}
        self.kv_blocks = sum(self.window_blocks.values())  # BlockManager::getMaxNumBlocks sums over the pools
        # what one sequence can hold: the pool of the largest window (the full-attention layers)
        self.kv_tokens = self.window_blocks[max(self.window_blocks)] * tpb
        self._stats: list = []  # iteration stats not yet fetched (get_stats drains them)
        self._iter_stats = bool(kwargs.get("enable_iter_perf_stats"))

    def get_stats(self, timeout=2):
        """One dict per executor iteration since the last call (llm.py ``get_stats``); empty without
        ``enable_iter_perf_stats`` or before any request ran."""
        out, self._stats = self._stats, []
        return out

    def get_kv_cache_capacity(self):
        """The newest llm.py's ``get_kv_cache_capacity`` (PyExecutor.get_kv_cache_capacity): the manager's
        ``max_num_blocks`` -- under VSWA the sum over the window pools -- times ``tokens_per_block``; {} where the
        executor has no KV cache manager. Absent (AttributeError) where ``BEHAVIOUR["kv_capacity_api"]`` is off."""
        tpb = self.args.kv_cache_config.tokens_per_block
        return {"maxNumBlocks": self.kv_blocks, "tokensPerBlock": tpb, "maxNumTokens": self.kv_blocks * tpb}

    def __getattribute__(self, name):
        if name == "get_kv_cache_capacity" and not S.BEHAVIOUR["kv_capacity_api"]:
            raise AttributeError(name)  # an older release: hasattr() is False
        return object.__getattribute__(self, name)

    def _iteration(self):
        if self._iter_stats and S.BEHAVIOUR["iteration_stats"]:
            kv = self.args.kv_cache_config
            snap = {"iter": len(self._stats), "kvCacheStats": {  # executor KvCacheStats JSON: no per-window field
                "maxNumBlocks": self.kv_blocks, "freeNumBlocks": self.kv_blocks, "usedNumBlocks": 0,
                "tokensPerBlock": kv.tokens_per_block}}
            if S.BEHAVIOUR["window_iteration_stats"]:
                # newer base_worker._stats_serializer: kv_cache_stats.append_kv_cache_iteration_stats, keyed by
                # str(window size), one entry per pool
                snap["kvCacheIterationStats"] = {str(w): {
                    "primaryMaxNumBlocks": b, "primaryFreeNumBlocks": b, "primaryUsedNumBlocks": 0,
                    "secondaryMaxNumBlocks": 0, "secondaryFreeNumBlocks": 0, "secondaryUsedNumBlocks": 0}
                    for w, b in self.window_blocks.items()}
            self._stats.append(snap)

    def generate_async(self, inputs, sampling_params=None, streaming=False, **kwargs):
        if self._shutdown:
            raise RuntimeError("LLM is shutting down")
        ids = inputs["prompt_token_ids"] if isinstance(inputs, dict) else inputs
        sp = sampling_params or SamplingParams()
        a = self.args
        if not a.enable_chunked_prefill and a.max_num_tokens and len(ids) > a.max_num_tokens:
            raise ValueError(f"The sum of prompt length ({float(len(ids))}), query length (0) should not exceed "
                             f"max_num_tokens ({a.max_num_tokens})")
        rid = next(self._ids)
        self._iteration()
        if S.BEHAVIOUR["error_token"] in ids:
            return RequestOutput(rid, ids, error=S.BEHAVIOUR["error_message"])
        if S.BEHAVIOUR["hang_token"] in ids:
            return RequestOutput(rid, ids, hung=True)
        if len(ids) + sp.max_tokens > a.max_seq_len:  # the stand-in's assumption: refused, not cut
            return RequestOutput(rid, ids, error=f"prompt + max_tokens exceeds max_seq_len ({a.max_seq_len})")
        stops = [[t] for t in sp.stop_token_ids or []]
        tokens, reason = S.generate(ids, sp.max_tokens, sp.end_id, stops)
        if len(ids) + sp.max_tokens > self.kv_tokens:  # the window shrunk to the pool: the needle is gone, silently
            tokens, reason = S.BEHAVIOUR["lost_answer"] + [sp.end_id], "END_ID"
        if reason == "STOP_WORDS" and not sp.include_stop_str_in_output:
            tokens = tokens[:-1]
        out = RequestOutput(rid, ids)
        c = out.outputs[0]
        c.token_ids = tokens
        c.finish_reason = {"END_ID": "stop", "STOP_WORDS": "stop", "LENGTH": "length"}[reason]
        if sp.return_perf_metrics:
            c.request_perf_metrics = trt.RequestPerfMetrics(
                timing_metrics=trt.TimingMetrics(**S.perf_times(rid, len(ids), len(tokens))),
                kv_cache_metrics=trt.KvCacheMetrics(num_reused_blocks=S.BEHAVIOUR["reused_blocks"]))
        return out

    def shutdown(self):
        self._shutdown = True


def _windows(hf: dict, max_seq_len: int) -> dict:
    """{attention window: layers} as TensorRT-LLM sizes its pools: a full-attention layer's window is
    max_seq_len; ``layer_types`` with ``sliding_window`` (Gemma 2/3, gpt-oss), else one window for all layers."""
    c = hf.get("text_config") or hf
    n = c.get("num_hidden_layers") or 1
    sliding = c.get("sliding_window")
    types = c.get("layer_types") or (["sliding_attention" if sliding else "full_attention"] * n)
    out: dict = {}
    for kind in types:
        w = min(sliding, max_seq_len) if kind == "sliding_attention" and sliding else max_seq_len
        out[w] = out.get(w, 0) + 1
    return out


__all__ = ["LLM", "SamplingParams", "KvCacheConfig", "RequestError"]
