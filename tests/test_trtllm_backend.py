"""The ``trtllm`` backend (C++ executor) against the stand-in tensorrt_llm of tests/standin.

The stand-in enforces the executor's real checks (world size vs tp*pp*cp without participant ids, participant and
device ids, engine files per session rank, leader-only enqueue, error responses whose ``result`` throws, streaming
shapes, max input length, max_tokens lowered past max_seq_len), so each test fails the way a real run would.
Multi-replica runs under a real mpirun are in test_trtllm_mpi.py.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest

from evalctx.backends.base import BackendContext, parse_options
from evalctx.backends.trtllm.backend import TRTLLMBackend
from evalctx.backends.trtllm.launch import place, session_order
from evalctx.errors import UsageError
from evalctx.records import FLAGS, GenerationRequest
from evalctx.models.tokenizer import ByteTokenizer
from trtllm_util import FakeComm, make_engine, request, standin  # noqa: F401  (standin is a fixture)


def backend(engine: Path, ctx: dict | None = None, **options: object) -> TRTLLMBackend:
    c = dict(model=str(engine), tokenizer=ByteTokenizer(), max_input_len=1000, max_new_tokens=8)
    c.update(ctx or {})
    return TRTLLMBackend(parse_options(TRTLLMBackend, options), BackendContext(**c))


def test_executor_gets_the_runtime_settings_and_the_manifest_says_so(standin, tmp_path, caplog):
    engine = make_engine(tmp_path)
    with caplog.at_level(logging.WARNING, "evalctx.backends.trtllm"):
        b = backend(engine, enable_chunked_context="true", max_tokens_in_paged_kv_cache="1100000")
    cfg = b._executor.config
    kv = cfg.kv_cache_config
    assert (kv.max_tokens, kv.free_gpu_memory_fraction, kv.enable_block_reuse) == (1_100_000, 0.9, False)
    assert kv.max_attention_window is None and kv.sink_token_length is None
    assert cfg.enable_chunked_context is True and cfg.fail_fast_on_attention_window_too_large is True
    assert (cfg.max_batch_size, cfg.max_beam_width) == (1, 1)
    # one replica: TensorRT-LLM's defaults, exactly what its own scripts run
    assert cfg.parallel_config.participant_ids is None and cfg.parallel_config.device_ids is None
    assert not caplog.records and b.dropped == []
    info = b.info()
    json.dumps(info)
    assert info["tensorrt_llm_version"] == "1.2.0" and info["end_ids"] == [2]
    cols = b.row_columns()
    # the C++ runtime's limits, not a Python runner's: chunked context takes prompts up to max_seq_len - 1
    assert cols["runtime_max_seq_len"] == 1_048_576 and cols["runtime_max_input_len"] == 1_048_575
    assert cols["runtime_attention_window"] == 1_048_576 and cols["runtime_timing"] == "executor"
    assert cols["engine_tokens_per_block"] == 32 and cols["runtime_kv_cache_enable_block_reuse"] is False


def test_rows_hold_generated_tokens_only_and_the_executors_own_timers(standin, tmp_path):
    b = backend(make_engine(tmp_path, max_batch_size=4), max_batch_size="4")
    reqs = [request("a"), request("b", "x" * 40, new=2)]
    out = b.generate(reqs)
    # the stand-in returns the prompt unless exclude_input_from_output, and the end id as last token: neither shows
    assert [r.text for r in out] == [" 42", " 4"]
    assert [r.finish_reason for r in out] == ["stop", "length"] and [r.n_output_tokens for r in out] == [3, 2]
    for r, req in zip(out, reqs):
        t = standin.perf_times(0, len(req.prompt_ids), 0)  # TTFT = 0.25 s + 0.1 ms per prompt token
        assert r.ttft_s == pytest.approx((t["first_token_time"] - t["arrival_time"]).total_seconds())
        assert r.latency_s >= r.ttft_s and r.n_cached_prompt_tokens == 0 and r.flags == [] and r.error is None
    assert out[0].latency_s == pytest.approx(out[0].ttft_s + 0.03)  # 4 tokens out (the end id included)


def test_requests_carry_every_end_id(standin, tmp_path):
    model = tmp_path / "tok"
    model.mkdir()
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 10]}))
    tok = ByteTokenizer()
    tok.path = model  # as HFTokenizer has: generation_config.json sits next to the tokenizer
    standin.BEHAVIOUR["answer"] = [55, 53, 10, 60]  # "42", then the second end id (a Llama-3 <|eot_id|>)
    b = backend(make_engine(tmp_path), dict(tokenizer=tok))
    assert b.end_ids == [2, 10] and b.row_columns()["runtime_end_ids"] == "2,10"
    (r,) = b.generate([request("a")])
    assert (r.text, r.finish_reason, r.n_output_tokens) == ("42", "stop", 2)
    b2 = backend(make_engine(tmp_path), end_ids="7")
    assert b2.end_ids == [7]
    assert b2.generate([request("b")])[0].n_output_tokens == 4  # 10 no longer ends it: 55 53 10 60, then 7


def test_one_requests_error_becomes_its_row_and_nothing_is_left_behind(standin, tmp_path):
    standin.BEHAVIOUR["error_token"] = ord("!") + ByteTokenizer.OFFSET
    b = backend(make_engine(tmp_path, max_batch_size=4), max_batch_size="3")
    out = b.generate([request("a"), request("bad", "boom!"), request("c")])
    assert [r.text for r in out] == [" 42", None, " 42"]
    assert out[1].error == "[TensorRT-LLM][ERROR] stand-in: injected request error"
    # the next batch sees only its own responses (no stale ids waiting in the executor)
    assert [r.text for r in b.generate([request("d")])] == [" 42"]


def test_a_request_without_final_response_is_cancelled_at_the_deadline(standin, tmp_path):
    standin.BEHAVIOUR["hang_token"] = ord("?") + ByteTokenizer.OFFSET
    b = backend(make_engine(tmp_path, max_batch_size=2), max_batch_size="2", request_timeout_s="0.2")
    out = b.generate([request("stuck", "where?"), request("ok")])
    assert out[0].text is None and "request_timeout_s=0.2 s: cancelled" in out[0].error
    assert out[1].text == " 42"
    assert b._executor._hung == {}  # cancelled in the executor, not abandoned
    assert b.generate([request("next")])[0].text == " 42"


def test_cuda_errors_end_the_run(standin, tmp_path):
    standin.BEHAVIOUR.update(error_token=ord("!") + 3, error_message="[TensorRT-LLM][ERROR] CUDA runtime error in "
                             "cudaMemcpy: an illegal memory access was encountered")
    b = backend(make_engine(tmp_path))
    with pytest.raises(RuntimeError, match="illegal memory access"):
        b.generate([request("a", "boom!")])


def test_the_standin_enforces_the_world_size_rule(standin, tmp_path):
    """Without participant ids the executor wants MPI_COMM_WORLD == tp*pp*cp: 2 ranks and a TP1 engine fail."""
    from tensorrt_llm.bindings import executor as trt

    engine = make_engine(tmp_path)
    standin.WORLD.update(rank=1, size=2)
    cfg = trt.ExecutorConfig(max_beam_width=1)
    cfg.parallel_config = trt.ParallelConfig(trt.CommunicationType.MPI, trt.CommunicationMode.LEADER)
    with pytest.raises(RuntimeError, match="participantIds are not specified"):
        trt.Executor(engine, trt.ModelType.DECODER_ONLY, cfg)
    cfg.parallel_config = trt.ParallelConfig(participant_ids=[1], device_ids=[1, 2])
    with pytest.raises(RuntimeError, match="deviceIds size must be equal to tp\\*pp\\*cp"):
        trt.Executor(engine, trt.ModelType.DECODER_ONLY, cfg)


def test_one_rank_replicas_pass_their_participant_and_device_ids(standin, tmp_path, monkeypatch):
    standin.WORLD.update(rank=1, size=2)  # mpirun -n 2 with a TP1 engine: 2 replicas
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1")
    b = backend(make_engine(tmp_path), dict(world_rank=1, world_size=2, replica=1, rank_in_replica=0))
    pc = b._executor.config.parallel_config
    assert (pc.participant_ids, pc.device_ids) == ([1], [1])
    assert b._executor.is_leader and b._executor.device == 1  # session rank 0 of its own replica, on GPU 1
    assert b.replicas == 2 and b.generate([request("a")])[0].text == " 42"


def test_more_ranks_on_a_node_than_the_engines_gpus_per_node_is_refused(standin, tmp_path, monkeypatch):
    """mpirun -n 8 with a TP1 engine built for 4 GPUs per node: ranks 4..7 have no GPU of their own. The executor
    refuses device ids >= gpus_per_node (worldConfig.cpp) and its default would put them on GPU 0, shared with
    replica 0, so their latencies would be wrong: a usage error instead."""
    engine = make_engine(tmp_path)
    cfg = json.loads((engine / "config.json").read_text())
    cfg["pretrained_config"]["mapping"]["gpus_per_node"] = 4
    (engine / "config.json").write_text(json.dumps(cfg))
    standin.WORLD.update(rank=5, size=8)
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "5")
    with pytest.raises(UsageError, match="rank 5 is rank 5 of its node, but the engine was built for 4 GPUs per node"):
        backend(engine, dict(world_rank=5, world_size=8, replica=5, rank_in_replica=0))


def test_a_tp2_follower_builds_the_executor_and_never_enqueues(standin, tmp_path, monkeypatch):
    standin.WORLD.update(rank=3, size=4)
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "3")
    comm = FakeComm(2, gathered=[(2, 2), (3, 3)])
    b = backend(make_engine(tmp_path, tp=2), dict(world_rank=3, world_size=4, replica=1, rank_in_replica=1,
                                                  replica_comm=comm))
    pc = b._executor.config.parallel_config
    assert (pc.participant_ids, pc.device_ids) == ([2, 3], [2, 3]) and b._executor.device == 3
    assert not b._executor.is_leader
    # the stand-in raises if a follower enqueues or awaits: placeholders come back without touching it
    assert [(r.text, r.error) for r in b.generate([request("a"), request("b")])] == [(None, None), (None, None)]


def test_session_order_follows_the_executor_for_pipeline_parallel(monkeypatch):
    # executorImpl.cpp: ids reversed for pp > 1, then each tp group reversed back
    assert session_order([4, 5, 6, 7], tp=2, pp=2) == [6, 7, 4, 5]
    assert session_order([4, 5, 6, 7], tp=1, pp=4) == [7, 6, 5, 4]
    assert session_order([4, 5, 6, 7], tp=4, pp=1) == [4, 5, 6, 7]
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1")
    comm = FakeComm(4, gathered=[(4, 0), (5, 1), (6, 2), (7, 3)])
    p = place(world_rank=5, world_size=8, ranks_per_replica=4, replica_comm=comm, tp=2, pp=2, gpus_per_node=8)
    assert p.participant_ids == [4, 5, 6, 7] and p.device_ids == [2, 3, 0, 1] and p.device == 1
    spans = FakeComm(2, gathered=[(8, 0), (9, 0)])  # one replica over two nodes: local GPUs repeat
    assert place(world_rank=8, world_size=4, ranks_per_replica=2, replica_comm=spans, tp=2, pp=1,
                 gpus_per_node=8).device_ids is None


def test_world_must_equal_tp_times_pp_before_loading(standin, tmp_path):
    with pytest.raises(UsageError, match=r"tp 2 x pp 2 x cp 1 = 4 ranks but this replica has 2.*mpirun -n 4"):
        backend(make_engine(tmp_path, tp=2, pp=2), dict(world_size=2, replica_comm=FakeComm(2)))
    assert TRTLLMBackend.ranks_per_replica(TRTLLMBackend.Options(), str(make_engine(tmp_path, tp=2, pp=2))) == 4


def test_missing_tensorrt_llm_says_how_to_install(tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorrt_llm") is not None:
        pytest.skip("a real tensorrt_llm is installed")
    with pytest.raises(UsageError, match=r"pip install 'evalctx\[trtllm\]'"):
        backend(make_engine(tmp_path))


def test_an_older_release_is_timed_on_the_host_and_says_so(standin, tmp_path, caplog):
    standin.DROPPED.update({"OutputConfig.return_perf_metrics", "OutputConfig.exclude_input_from_output",
                            "ExecutorConfig.fail_fast_on_attention_window_too_large"})
    with caplog.at_level(logging.WARNING, "evalctx.backends.trtllm"):
        b = backend(make_engine(tmp_path))
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "OutputConfig.return_perf_metrics" in text and "fail_fast_on_attention_window_too_large" in text
    cols = b.row_columns()
    assert cols["runtime_timing"] == "host" and cols["runtime_fail_fast_on_attention_window"] is None
    (r,) = b.generate([request("a")])
    assert r.text == " 42" and r.flags == ["host_timing"] and r.ttft_s is None and r.latency_s > 0  # prompt sliced off
    assert "host_timing" in FLAGS
    s = backend(make_engine(tmp_path), streaming_ttft="true")
    (r,) = s.generate([request("a")])  # streamed: one token per response, the prompt never comes back
    assert r.text == " 42" and 0 <= r.ttft_s <= r.latency_s and r.flags == ["host_timing"]


def test_a_release_without_participant_ids_support_is_refused(standin, tmp_path):
    standin.DROPPED.add("ExecutorConfig.parallel_config")
    with pytest.raises(UsageError, match="ExecutorConfig.parallel_config"):
        backend(make_engine(tmp_path))


def test_limits_are_the_runtimes(standin, tmp_path):
    b = backend(make_engine(tmp_path, max_seq_len=2048, max_num_tokens=512))
    specs = [SimpleNamespace(id="fits", context_length=2040, max_new_tokens=8),
             SimpleNamespace(id="over", context_length=2041, max_new_tokens=8)]
    # prompt + max_new_tokens == max_seq_len is accepted by the runtime (LlmRequest::validate)
    unsupported = b.preflight(specs)
    assert list(unsupported) == ["over"] and "--max_seq_len >= 2049" in unsupported["over"]
    too_long = GenerationRequest(sample_id="x", prompt_ids=[5] * 2041, prompt="", max_new_tokens=8)
    out = b.generate([too_long, GenerationRequest(sample_id="y", prompt_ids=[5] * 2040, prompt="", max_new_tokens=8)])
    # sent, the runtime would have lowered max_tokens to 7 and cut the answer: it is an error row instead
    assert "max_seq_len is 2048" in out[0].error and out[1].text == " 42"


def test_an_answer_the_runtime_cut_is_an_error_row_even_past_the_checks(standin, tmp_path, monkeypatch):
    """Were a request to slip past preflight, the executor lowers max_tokens (LlmRequest::validate) and ends with
    LENGTH before the budget: that answer is cut, so it must be an error row, never an ok row."""
    from evalctx.backends.trtllm import backend as trt_backend

    standin.BEHAVIOUR["answer"] = [55, 53, 60, 61, 62, 63, 64, 65, 66, 67]
    b = backend(make_engine(tmp_path, max_seq_len=2048))
    monkeypatch.setattr(trt_backend, "check", lambda *a: None)  # the checks bypassed
    out = b.generate([GenerationRequest(sample_id="x", prompt_ids=[5] * 2044, prompt="", max_new_tokens=8)])
    assert out[0].text is None and "ended after 4 of max_new_tokens 8 tokens" in out[0].error
    assert "finish reason LENGTH" in out[0].error


def test_without_paged_context_fmha_long_prompts_are_unsupported(standin, tmp_path):
    b = backend(make_engine(tmp_path, use_paged_context_fmha=False), enable_chunked_context="true")
    assert b.row_columns()["runtime_enable_chunked_context"] is False
    assert b._executor.config.enable_chunked_context is False
    specs = [SimpleNamespace(id="a", context_length=5000, max_new_tokens=8)]
    assert "no paged context FMHA" in b.preflight(specs)["a"]


def test_attention_window_and_sink_tokens_reach_the_executor_and_preflight(standin, tmp_path):
    b = backend(make_engine(tmp_path), max_attention_window_size="1000", sink_token_length="4")
    kv = b._executor.config.kv_cache_config
    assert (kv.max_attention_window, kv.sink_token_length) == ([1000], 4)
    assert b._executor.attention_window == 1000 and b.row_columns()["runtime_attention_window"] == 1000
    specs = [SimpleNamespace(id="in", context_length=992, max_new_tokens=8),
             SimpleNamespace(id="out", context_length=993, max_new_tokens=8)]
    reason = b.preflight(specs)
    assert list(reason) == ["out"] and "attention sees only the last 1000 tokens and its first 4 (sink tokens)" in reason["out"]


def test_the_engines_own_sliding_window_reaches_preflight(standin, tmp_path):
    """An engine whose config.json carries runtime defaults (a model's sliding window) gets them from the executor
    (KvCacheConfig runtime_defaults, as from_dir passes them): preflight must refuse what that window hides."""
    engine = make_engine(tmp_path)
    cfg = json.loads((engine / "config.json").read_text())
    cfg["pretrained_config"]["runtime_defaults"] = {"max_attention_window": [4096], "sink_token_length": 2}
    (engine / "config.json").write_text(json.dumps(cfg))
    b = backend(engine)
    assert b._executor.attention_window == 4096
    cols = b.row_columns()
    assert (cols["runtime_attention_window"], cols["runtime_sink_token_length"]) == (4096, 2)
    reason = b.preflight([SimpleNamespace(id="in", context_length=4088, max_new_tokens=8),
                          SimpleNamespace(id="out", context_length=8000, max_new_tokens=8)])
    assert list(reason) == ["out"] and "attention sees only the last 4096 tokens and its first 2" in reason["out"]
    # an explicit option wins over the engine's default, as fillEmptyFieldsFromRuntimeDefaults fills only unset fields
    assert backend(engine, max_attention_window_size="9000").row_columns()["runtime_attention_window"] == 9000


@pytest.mark.parametrize("option, value, want", [
    ("request_timeout_s", "0", "> 0 seconds, or unset to scale with the prompt"),  # else every request is cancelled at once: an all-error run
    ("max_batch_size", "0", ">= 1"), ("kv_cache_free_gpu_memory_fraction", "1.5", "in (0, 1]"),
    ("max_tokens_in_paged_kv_cache", "0", ">= 1 tokens"), ("max_attention_window_size", "0", ">= 1 tokens"),
    ("sink_token_length", "-1", ">= 0 tokens"),
    ("end_ids", "-1", "token ids >= 0"),
])
def test_out_of_range_options_are_usage_errors(standin, tmp_path, option, value, want):
    with pytest.raises(UsageError, match=rf"backend option {option}=.* \(want {re.escape(want)}\)"):
        backend(make_engine(tmp_path), **{option: value})


def test_an_executor_that_refuses_to_load_is_a_one_line_usage_error(standin, tmp_path):
    """fail_fast_on_attention_window_too_large (evalctx's default) with a KV cache smaller than max_seq_len: the
    executor throws at load; the user gets one line saying what to change, not a traceback."""
    with pytest.raises(UsageError) as err:
        backend(make_engine(tmp_path, max_seq_len=4096), max_tokens_in_paged_kv_cache="1000")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("tensorrt_llm could not load engine ")
    assert "Attention window too large" in msg and "max_attention_window_size=<longest prompt" in msg
    # what the advice says works: a window the cache holds, or fail-fast off with preflight doing the refusing
    assert backend(make_engine(tmp_path, max_seq_len=4096), max_tokens_in_paged_kv_cache="1000",
                   max_attention_window_size="1000").generate([request("a")])[0].text == " 42"
    b = backend(make_engine(tmp_path, max_seq_len=4096), max_tokens_in_paged_kv_cache="1000",
                fail_fast_on_attention_window_too_large="false")
    assert list(b.preflight([SimpleNamespace(id="long", context_length=1000, max_new_tokens=8)])) == ["long"]


def test_block_reuse_makes_the_cached_prompt_count_unknown_and_flags_the_row(standin, tmp_path):
    standin.BEHAVIOUR["reused_blocks"] = 4
    (r,) = backend(make_engine(tmp_path), kv_cache_enable_block_reuse="true").generate([request("a")])
    assert r.n_cached_prompt_tokens is None and r.flags == ["kv_cache_reuse"] and "kv_cache_reuse" in FLAGS
    (r,) = backend(make_engine(tmp_path)).generate([request("a")])
    assert r.n_cached_prompt_tokens == 0 and r.flags == []


def test_lora_adapters_load_on_the_leader_and_requests_use_string_uids(standin, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    engine = make_engine(tmp_path, lora_plugin="float16", max_batch_size=4)
    b = backend(engine, lora_dir=str(adapter), max_batch_size="4")
    from tensorrt_llm.runtime import generation

    assert generation.LOADED == [([str(adapter)], "hf")]
    peft = b._executor.config.peft_cache_config
    assert peft.num_device_module_layer == 64 * 32 * 3 * 1  # max_lora_rank x layers x modules x adapters
    seen = []
    enqueue = b._executor.enqueue_requests
    b._executor.enqueue_requests = lambda reqs: seen.extend(reqs) or enqueue(reqs)
    out = b.generate([request("a", lora_task_uid=0), request("b"), request("c", lora_task_uid="5")])
    assert [r.text for r in out[:2]] == [" 42", " 42"] and "LoRA uid '5'" in out[2].error
    assert [(r.lora_config.task_id, r.lora_config.weights) if r.lora_config else None for r in seen] == [
        (0, f"weights:{adapter}"), None]
    with pytest.raises(UsageError, match="without lora_plugin"):
        backend(make_engine(tmp_path, name="plain"), lora_dir=str(adapter))


def test_close_shuts_the_executor_down(standin, tmp_path):
    b = backend(make_engine(tmp_path))
    executor = b._executor
    b.close()
    assert executor._shutdown and b._executor is None
    b.close()  # twice is harmless


def test_await_timeout_is_a_timedelta(standin, tmp_path):
    """The binding's chrono caster wants a timedelta; the stand-in refuses floats as it would."""
    b = backend(make_engine(tmp_path))
    with pytest.raises(TypeError):
        b._executor.await_responses(timeout=0.5)
    assert b._executor.await_responses(timeout=timedelta(milliseconds=1)) == []


def test_the_standin_does_not_leak():
    import importlib.util

    assert "tensorrt_llm" not in sys.modules
    spec = importlib.util.find_spec("tensorrt_llm")
    assert spec is None or "standin" not in str(spec.origin)


def test_a_release_without_participant_ids_cannot_run_replicas(standin, tmp_path, monkeypatch):
    from tensorrt_llm.bindings import executor as trt

    monkeypatch.delitem(trt.ParallelConfig.FIELDS, "participant_ids")
    standin.WORLD.update(rank=0, size=2)
    with pytest.raises(UsageError, match="takes no device_ids or participant_ids: run one replica per mpirun"):
        backend(make_engine(tmp_path), dict(world_rank=0, world_size=2))


def test_an_executor_that_never_ends_cancelled_requests_fails_the_run_instead_of_hanging(standin, tmp_path,
                                                                                         monkeypatch):
    """The cancellation is lost (the execution thread is stuck): the batch fails the run, and close() leaves the
    executor alone, since its shutdown() would join the stuck thread forever (the stand-in raises instead)."""
    from evalctx.backends.trtllm import executor as ex

    standin.BEHAVIOUR.update(hang_token=ord("?") + ByteTokenizer.OFFSET, cancel_lost=True)
    monkeypatch.setattr(ex, "CANCEL_GRACE_S", 0.1)
    b = backend(make_engine(tmp_path), request_timeout_s="0.1")
    executor = b._executor
    with pytest.raises(RuntimeError, match=r"cancelled requests \[1\] got no final response"):
        b.generate([request("stuck", "where?")])
    b.close()
    assert executor._wedged and not executor._shutdown and b._executor is None


def test_the_standin_binds_as_loosely_as_the_real_bindings(standin):
    """ExecutorConfig is bound with nb::dynamic_attr(): an attribute a release lacks is set and ignored. The other
    classes raise; KvCacheConfig.enable_block_reuse defaults to True; fields are class properties."""
    from tensorrt_llm.bindings import executor as trt

    from evalctx.backends.trtllm.executor import has_field

    config = trt.ExecutorConfig()
    config.not_a_field = 1  # no error, as with the real binding
    assert not has_field(config, "not_a_field") and has_field(config, "fail_fast_on_attention_window_too_large")
    with pytest.raises(AttributeError):
        trt.OutputConfig().not_a_field = 1
    with pytest.raises(TypeError):
        trt.ExecutorConfig(not_a_field=1)  # the constructor rejects unknown keywords
    assert trt.KvCacheConfig().enable_block_reuse is True
    standin.DROPPED.add("ExecutorConfig.fail_fast_on_attention_window_too_large")
    older = trt.ExecutorConfig()
    older.fail_fast_on_attention_window_too_large = True  # accepted into __dict__ ...
    assert not has_field(older, "fail_fast_on_attention_window_too_large")
    assert older.field("fail_fast_on_attention_window_too_large", False) is False  # ... and never seen by C++


def test_a_field_an_older_executor_config_lacks_is_dropped_not_recorded_as_on(standin, tmp_path, caplog):
    """Setting it succeeds (dynamic attr), so only the class's properties tell; the window then shrinks silently,
    and the run says fail-fast was not applied."""
    standin.DROPPED.add("ExecutorConfig.fail_fast_on_attention_window_too_large")
    with caplog.at_level(logging.WARNING, "evalctx.backends.trtllm"):
        b = backend(make_engine(tmp_path, max_seq_len=4096), max_tokens_in_paged_kv_cache="1000")
    assert b.dropped == ["ExecutorConfig.fail_fast_on_attention_window_too_large"]
    assert b.row_columns()["runtime_fail_fast_on_attention_window"] is None
    assert "cannot fail fast" in caplog.text and "shrinks it silently" in caplog.text
    assert b._executor.attention_window == 1000  # loaded, window shrunk: what preflight must now refuse
    assert list(b.preflight([SimpleNamespace(id="long", context_length=1000, max_new_tokens=8)])) == ["long"]


def test_engine_stored_lora_adapters_use_the_engines_checkpoint_format(standin, tmp_path):
    """ModelRunnerCpp.from_dir: adapters stored in the engine are loaded with build_config.lora_config's
    lora_ckpt_source, not the caller's default "hf"."""
    from tensorrt_llm.runtime import generation

    engine = make_engine(tmp_path, lora_plugin="float16", lora_config={
        "lora_dir": ["lora/0"], "lora_ckpt_source": "nemo", "max_lora_rank": 64, "lora_target_modules": []})
    (engine / "lora" / "0").mkdir(parents=True)
    b = backend(engine)
    assert generation.LOADED == [([str(engine / "lora" / "0")], "nemo")]
    assert b.applied["lora_dir"] == str(engine / "lora" / "0")
    with pytest.raises(UsageError, match="lora_ckpt_source=hf but the adapters stored in engine .* are nemo") as err:
        backend(engine, lora_ckpt_source="hf")
    assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match="lora_ckpt_source='safetensors' is not a LoRA checkpoint format"):
        backend(engine, lora_ckpt_source="safetensors")
    adapter = tmp_path / "given"
    adapter.mkdir()
    backend(engine, lora_dir=str(adapter))
    assert generation.LOADED[-1] == ([str(adapter)], "hf")  # given folders: from_dir's default format


@pytest.mark.parametrize("visible, ok", [(None, True), ("0,1,2,3", True), ("3", False), ("", False),
                                         ("0,1,-1,3", False)])
def test_a_per_rank_cuda_visible_devices_that_hides_the_ranks_gpu_is_one_line(standin, tmp_path, monkeypatch,
                                                                                visible, ok):
    """Rank 2 of a TP4 engine selects GPU 2 (session rank % gpus_per_node); a launcher that sets
    CUDA_VISIBLE_DEVICES to the rank's own GPU leaves it index 0 only, and cudaSetDevice(2) would fail in the load."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    if visible is not None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.setitem(standin.WORLD, "rank", 2)
    monkeypatch.setitem(standin.WORLD, "size", 4)
    ctx = dict(world_size=4, world_rank=2, rank_in_replica=2, replica_comm=FakeComm(4))
    if ok:
        b = backend(make_engine(tmp_path, tp=4), ctx)
        assert b._executor.device == 2
        return
    with pytest.raises(UsageError) as err:
        backend(make_engine(tmp_path, tp=4), ctx)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("rank 2: TensorRT-LLM will select GPU 2 but CUDA_VISIBLE_DEVICES=")
    assert "unset CUDA_VISIBLE_DEVICES in the per-rank launcher" in msg


def test_visible_gpu_counting_follows_cuda():
    from evalctx.backends.trtllm.launch import visible_gpus

    assert [visible_gpus(v) for v in ("0", "0,1", "", "-1", "0,-1,2", "GPU-1a2b,GPU-3c4d", " 0 , 1 ")] == [
        1, 2, 0, 0, 1, 2, 2]


def test_the_engine_backends_deadline_scales_with_the_batchs_prompt_tokens(standin, tmp_path, monkeypatch):
    from evalctx.backends.trtllm import executor as ex

    seen = []
    collect = ex.collect
    monkeypatch.setattr(ex, "collect", lambda *a, **k: seen.append(k["timeout_s"]) or collect(*a, **k))
    b = backend(make_engine(tmp_path, max_batch_size=2), max_batch_size="2")
    reqs = [request("a"), request("b", "x" * 99)]
    b.generate(reqs)
    assert seen == [pytest.approx(b.options.timeout_s(sum(len(r.prompt_ids) for r in reqs)))]
    assert seen[0] == pytest.approx(600 + 0.004 * 115)
    # issue 26 C: rows show the rule the deadline came from, the manifest the deadlines applied
    cols = b.row_columns()
    assert cols["runtime_request_timeout_s"] is None  # scaled: the two rule columns say how
    assert (cols["runtime_request_timeout_base_s"], cols["runtime_request_timeout_per_token_s"]) == (600.0, 0.004)
    assert b.info()["request_deadlines_s"] == {"batches": 1, "min_s": 600.46, "max_s": 600.46}
