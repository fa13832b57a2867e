"""The ``trtllm-llm`` backend (tensorrt_llm.LLM, PyTorch backend) against the stand-in of tests/standin."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from evalctx.backends.base import BackendContext, backend_class, parse_options
from evalctx.backends.trtllm.llm_api import TRTLLMAPIBackend
from evalctx.errors import UsageError
from evalctx.models.tokenizer import ByteTokenizer
from trtllm_util import request, standin  # noqa: F401  (standin is a fixture)


def hf_dir(tmp_path: Path, eos: object = 2) -> Path:
    path = tmp_path / "hf"
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                                  "max_position_embeddings": 131072}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    return path


def backend(model: Path, ctx: dict | None = None, **options: object) -> TRTLLMAPIBackend:
    c = dict(model=str(model), tokenizer=ByteTokenizer(), max_input_len=1000, max_new_tokens=8)
    c.update(ctx or {})
    return TRTLLMAPIBackend(parse_options(TRTLLMAPIBackend, options), BackendContext(**c))


def test_registered_and_the_llm_gets_the_long_context_settings(standin, tmp_path):
    assert backend_class("trtllm-llm") is TRTLLMAPIBackend
    b = backend(hf_dir(tmp_path), max_tokens_in_paged_kv_cache="1100000", tensor_parallel_size="2")
    from tensorrt_llm.llmapi import CALLS

    (call,) = CALLS
    kv = call.pop("kv_cache_config")
    assert (kv.max_tokens, kv.enable_block_reuse, kv.free_gpu_memory_fraction, kv.tokens_per_block) == (
        1_100_000, False, 0.9, 32)
    # the newest TorchLlmArgs has no fail-fast (a TrtLlmArgs field): dropped, quietly, as the cache is guarded anyway
    assert call == dict(model=str(tmp_path / "hf"), tokenizer=None, tensor_parallel_size=2, pipeline_parallel_size=1,
                        enable_chunked_prefill=True, max_seq_len=1008, max_num_tokens=8192, max_batch_size=1,
                        return_perf_metrics=True, enable_iter_perf_stats=True)
    assert b.dropped == ["LLM.fail_fast_on_attention_window_too_large"]
    cols = b.row_columns()
    assert cols["runtime_max_seq_len"] == 1008 and cols["tensorrt_llm_version"] == "1.2.0"
    assert cols["runtime_fail_fast_on_attention_window"] is None  # never recorded as on where it was not passed
    assert (cols["runtime_kv_cache_tokens"], cols["runtime_kv_cache_capacity_source"]) == (1_100_000, "allocated")
    assert cols["runtime_timing"] == "executor" and cols["runtime_tokens_per_block"] == 32
    json.dumps(b.info())


def test_rows_match_the_engine_backend(standin, tmp_path):
    standin.BEHAVIOUR["answer"] = [55, 53, 10, 60]
    b = backend(hf_dir(tmp_path, eos=[2, 10]), max_batch_size="4")
    assert b.end_ids == [2, 10]  # end_id 2, and 10 as a stop token id
    reqs = [request("a"), request("b", "x" * 40, new=1)]
    out = b.generate(reqs)
    assert [(r.text, r.finish_reason) for r in out] == [("42", "stop"), ("4", "length")]
    for r, req in zip(out, reqs):
        t = standin.perf_times(0, len(req.prompt_ids), 0)
        assert r.ttft_s == pytest.approx((t["first_token_time"] - t["arrival_time"]).total_seconds())
        assert r.n_cached_prompt_tokens == 0 and r.flags == [] and r.n_prompt_tokens == len(req.prompt_ids)


@pytest.mark.parametrize("result_timeout", ["ignored", "honoured"])
def test_errors_and_stuck_requests_end_only_their_own_rows(standin, tmp_path, result_timeout):
    """The newest result.py ignores result(timeout)'s timeout (a stuck request would block forever); older ones
    raise queue.Empty after it. Either way the stuck request is aborted at the deadline and ends only its row."""
    standin.BEHAVIOUR.update(error_token=ord("!") + 3, hang_token=ord("?") + 3, result_timeout=result_timeout,
                             block_cap_s=5.0)
    b = backend(hf_dir(tmp_path), max_batch_size="3", request_timeout_s="0.1")
    t0 = time.perf_counter()
    out = b.generate([request("bad", "boom!"), request("stuck", "where?"), request("ok")])
    assert time.perf_counter() - t0 < 2.0
    assert out[0].error == "RequestError: [TensorRT-LLM][ERROR] stand-in: injected request error"
    assert "request_timeout_s=0.1 s: aborted" in out[1].error and out[2].text == " 42"
    assert b.generate([request("next")])[0].text == " 42"


def test_an_abort_that_never_ends_the_request_fails_the_run_instead_of_hanging(standin, tmp_path, monkeypatch):
    from evalctx.backends.trtllm import waiting

    standin.BEHAVIOUR.update(hang_token=ord("?") + 3, abort_lost=True, block_cap_s=2.0)
    monkeypatch.setattr(waiting, "ABORT_GRACE_S", 0.1)
    b = backend(hf_dir(tmp_path), request_timeout_s="0.1")
    with pytest.raises(RuntimeError, match=r"aborted requests \['stuck'\] got no final response within 0.1 s"):
        b.generate([request("stuck", "where?")])
    llm = b._llm
    b.close()  # its shutdown would wait on the stuck request: left alone
    assert not llm._shutdown and b._llm is None


def test_preflight_uses_the_llms_limits(standin, tmp_path):
    b = backend(hf_dir(tmp_path), enable_chunked_prefill="false", max_num_tokens="512", max_seq_len="4096")
    specs = [SimpleNamespace(id="fits", context_length=500, max_new_tokens=8),
             SimpleNamespace(id="chunk", context_length=600, max_new_tokens=8),
             SimpleNamespace(id="long", context_length=4090, max_new_tokens=8)]
    reasons = b.preflight(specs)
    assert sorted(reasons) == ["chunk", "long"] and "enable_chunked_prefill=true" in reasons["chunk"]
    # trtllm-llm has no engine to rebuild: max_seq_len is the LLM's argument (issue 26, D)
    assert ("the LLM was loaded with max_seq_len 4096: pass --backend-opt max_seq_len=4098 or more"
            in reasons["long"] and "rebuild" not in reasons["long"] and "drop lengths > 4088" in reasons["long"])
    # a request the LLM would refuse at submission never reaches it, and is an error row
    too_long = request("x", "y" * 600)
    assert "max_num_tokens 512" in b.generate([too_long])[0].error


def test_several_ranks_are_refused(standin, tmp_path):
    with pytest.raises(UsageError, match="trtllm-llmapi-launch"):
        backend(hf_dir(tmp_path), dict(world_size=2, world_rank=1))


def test_an_older_llm_drops_unknown_arguments_with_a_warning(standin, tmp_path, caplog):
    from tensorrt_llm.llmapi.llm_args import TorchLlmArgs

    del TorchLlmArgs.model_fields["max_batch_size"]
    with caplog.at_level(logging.WARNING, "evalctx.backends.trtllm"):
        b = backend(hf_dir(tmp_path))
    assert "LLM has no max_batch_size; dropped" in caplog.text and b.dropped == [
        "LLM.max_batch_size", "LLM.fail_fast_on_attention_window_too_large"]
    assert "fail_fast" not in caplog.text  # guarded by the KV capacity instead: no warning on every run
    assert b.row_columns()["runtime_fail_fast_on_attention_window"] is None
    del TorchLlmArgs.model_fields["enable_chunked_prefill"]
    with pytest.raises(UsageError, match="enable_chunked_prefill"):
        backend(hf_dir(tmp_path))


def test_an_llm_that_refuses_to_load_is_a_one_line_usage_error(standin, tmp_path, monkeypatch):
    from tensorrt_llm import llmapi

    def refuse(self, *a, **k):
        raise RuntimeError("[TensorRT-LLM][ERROR] Assertion failed: Attention window too large\n(trace)")

    monkeypatch.setattr(llmapi.LLM, "__init__", refuse)
    with pytest.raises(UsageError, match=r"LLM\(\.\.\.\) refused the settings: .*Attention window too large; the KV "
                                         r"cache cannot hold one sequence"):
        backend(hf_dir(tmp_path))


def test_close_shuts_the_llm_down(standin, tmp_path):
    b = backend(hf_dir(tmp_path))
    llm = b._llm
    b.close()
    assert llm._shutdown and b._llm is None


@pytest.mark.parametrize("name", ["trtllm", "trtllm-llm"])
def test_a_whole_run_through_the_cli(tmp_path, name):
    """evalctx run in one process with the stand-in on PYTHONPATH: rows, executor timers and the manifest."""
    import os
    import subprocess
    import sys

    import pandas as pd

    from trtllm_util import STANDIN, make_engine

    model = make_engine(tmp_path, max_seq_len=4096) if name == "trtllm" else hf_dir(tmp_path)
    suite = Path(__file__).parent / "data" / "suites" / "fake_small.toml"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI"))}
    env["PYTHONPATH"] = os.pathsep.join([str(STANDIN), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "evalctx.cli", "run", "--suite", str(suite), "--backend", name,
                           "--model", str(model), "--tokenizer", "byte", "--out", str(tmp_path / "out"), "--run-id",
                           "r", "--no-progress"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    df = pd.read_parquet(tmp_path / "out" / "r" / "results.parquet")
    assert len(df) == 18 and (df["status"] == "ok").all() and (df["completion"] == " 42").all()
    assert df["ttft_s"].notna().all() and (df["runtime_timing"] == "executor").all()
    manifest = json.loads((tmp_path / "out" / "r" / "manifest.json").read_text())
    assert manifest["backend"]["tensorrt_llm_version"] == "1.2.0" and manifest["status"] == "complete"


def test_the_checkpoints_own_limits_and_tokenizer_are_checked(standin, tmp_path):
    """Issue 10 kinds 5 and 7 for the LLM API as for hf: a sliding window in every layer or learned absolute
    positions make longer prompts unsupported, a RoPE model's stated window flags rows, and a tokenizer that is
    not the checkpoint's is one line before the LLM loads."""
    import shutil

    from evalctx.models.embedded import resolve_model
    from evalctx.capacity.preflight import window_flags

    path = hf_dir(tmp_path)
    specs = [SimpleNamespace(id="short", context_length=200, max_new_tokens=6),
             SimpleNamespace(id="long", context_length=900, max_new_tokens=6)]
    (path / "config.json").write_text(json.dumps({"model_type": "mistral", "sliding_window": 256,
                                                  "max_position_embeddings": 32768}))
    reasons = backend(path).preflight(specs)
    assert list(reasons) == ["long"] and "attention sees only the last 256 tokens" in reasons["long"]
    (path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_positions": 512}))
    assert "512 learned absolute positions" in backend(path).preflight(specs)["long"]
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 512}))
    b = backend(path)
    assert b.preflight(specs) == {}
    assert window_flags(900, 6, b.limits()) == ["beyond_trained_window"] and window_flags(200, 6, b.limits()) == []

    tiny = tmp_path / "tiny"
    shutil.copytree(resolve_model("tiny").path, tiny)
    with pytest.raises(UsageError, match="does not tokenize like the one .* ships.*pass --tokenizer"):
        backend(tiny, {"tokenizer": ByteTokenizer()})


def test_a_kv_cache_smaller_than_a_sample_makes_it_unsupported_with_the_numbers(standin, tmp_path):
    """The PyTorch backend has no fail-fast: a pool smaller than the sequence shrinks the attention window and the
    needle is lost silently (the stand-in then answers " 0"). The capacity allocated at load is read back from the
    iteration stats, and longer samples never reach the LLM."""
    standin.BEHAVIOUR["kv_pool_tokens"] = 1000  # what the memory fraction gives: 31 blocks of 32 = 992 tokens
    b = backend(hf_dir(tmp_path), max_seq_len="4096")
    assert (b.kv_capacity, b.kv_blocks, b.kv_capacity_source) == (992, (31, 32), "allocated")
    specs = [SimpleNamespace(id="fits", context_length=984, max_new_tokens=8),
             SimpleNamespace(id="long", context_length=985, max_new_tokens=8)]
    reasons = b.preflight(specs)
    assert list(reasons) == ["long"] and "\n" not in reasons["long"]
    assert ("needs 1024 KV-cache tokens but the KV cache tensorrt_llm allocated holds 992 tokens (31 blocks of 32)"
            in reasons["long"] and "drop lengths > 984" in reasons["long"])
    out = b.generate([request("fits", "y" * 983), request("long", "y" * 984)])  # +BOS: 984 and 985 tokens
    assert out[0].text == " 42" and "allocated holds 992" in out[1].error  # never sent, never scored as wrong
    assert b.limits().kv_cache_tokens == 992 and b.row_columns()["runtime_kv_cache_tokens"] == 992


def test_without_the_guard_the_standin_loses_the_needle(standin, tmp_path):
    """The stand-in is as silent as the real backend: sent anyway, the long prompt is answered wrongly, no error."""
    standin.BEHAVIOUR["kv_pool_tokens"] = 1000
    b = backend(hf_dir(tmp_path), max_seq_len="4096")
    r = b._llm.generate_async({"prompt_token_ids": [5] * 985}, sampling_params=b._sampling(request("x", new=8)))
    assert r.result().outputs[0].token_ids[:2] == [35, 51]  # " 0": the needle's tokens were dropped


def test_a_release_that_reports_no_kv_cache_needs_the_token_budget(standin, tmp_path, caplog):
    standin.BEHAVIOUR.update(iteration_stats=False, kv_capacity_api=False)
    with pytest.raises(UsageError, match=r"did not report the KV cache it allocated .* pass --backend-opt "
                                         r"max_tokens_in_paged_kv_cache=N") as err:
        backend(hf_dir(tmp_path))
    assert "\n" not in str(err.value)
    with caplog.at_level(logging.WARNING, "evalctx.backends.trtllm"):
        b = backend(hf_dir(tmp_path), max_tokens_in_paged_kv_cache="2000", max_seq_len="4096")
    assert (b.kv_capacity, b.kv_capacity_source) == (2000, "requested") and "may undercut" in caplog.text
    reasons = b.preflight([SimpleNamespace(id="long", context_length=1995, max_new_tokens=8)])
    assert "max_tokens_in_paged_kv_cache is 2000" in reasons["long"]


def test_the_request_timeout_scales_with_the_prompt_unless_given(standin, tmp_path):
    from evalctx.backends.trtllm.backend import TIMEOUT_BASE_S, TIMEOUT_PER_TOKEN_S

    o = backend(hf_dir(tmp_path)).options
    assert o.request_timeout_s is None
    assert o.timeout_s(1_048_576) == pytest.approx(TIMEOUT_BASE_S + TIMEOUT_PER_TOKEN_S * 1_048_576)
    assert o.timeout_s(1_048_576) > 4000 and o.timeout_s(100) < 700  # a 1M prefill gets over an hour
    assert backend(hf_dir(tmp_path), request_timeout_s="30").options.timeout_s(1_048_576) == 30.0
    with pytest.raises(UsageError, match="request_timeout_s=0.0"):
        backend(hf_dir(tmp_path), request_timeout_s="0")


# --- issue 26 A: the KV capacity of a model with several attention window sizes (VSWA) ----------------------------
def gemma_dir(tmp_path: Path) -> Path:
    """A Gemma-3-like checkpoint: five sliding-window layers of 512 to one full-attention layer."""
    path = hf_dir(tmp_path)
    (path / "config.json").write_text(json.dumps({
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "max_position_embeddings": 131072,
        "num_hidden_layers": 6, "sliding_window": 512,
        "layer_types": ["sliding_attention"] * 5 + ["full_attention"]}))
    return path


def test_several_windows_hold_samples_to_the_largest_windows_pool_not_the_sum(standin, tmp_path):
    """TensorRT-LLM gives each window size its own pool and reports maxNumBlocks summed over them (2048 tokens
    here: 7 blocks for the 512 window, 57 for the 4096 one); a sample that fits the sum but not the full-attention
    layers' pool (1824 tokens) is answered wrongly without an error. It must be unsupported, with the numbers."""
    standin.BEHAVIOUR["kv_pool_tokens"] = 500
    b = backend(gemma_dir(tmp_path), max_seq_len="4096")
    assert b._llm.kv_blocks == 64 and b._llm.get_kv_cache_capacity()["maxNumTokens"] == 2048  # the sum
    assert (b.kv_capacity, b.kv_blocks, b.kv_window, b.kv_capacity_source) == (1824, (57, 32), 4096, "allocated")
    specs = [SimpleNamespace(id="fits", context_length=1800, max_new_tokens=8),
             SimpleNamespace(id="long", context_length=1900, max_new_tokens=8)]
    reasons = b.preflight(specs)
    assert list(reasons) == ["long"] and "\n" not in reasons["long"]
    assert "largest attention window (4096)" in reasons["long"] and "holds 1824 tokens" in reasons["long"]
    out = b.generate([request("fits", "y" * 1799), request("long", "y" * 1899)])  # +BOS
    assert out[0].text == " 42" and out[1].text is None and "holds 1824 tokens" in out[1].error
    assert b.row_columns()["runtime_kv_cache_tokens"] == 1824


def test_several_windows_without_per_window_stats_are_refused_in_one_line(standin, tmp_path):
    """A release whose stats carry only the summed maxNumBlocks: no safe capacity, and max_tokens is ignored
    under VSWA, so the run is refused whatever max_tokens_in_paged_kv_cache says."""
    standin.BEHAVIOUR["window_iteration_stats"] = False
    for opts in ({}, {"max_tokens_in_paged_kv_cache": "1000"}):
        with pytest.raises(UsageError, match=r"several attention window sizes \(512, full\).*no per-window "
                                             r"KV-cache figure.*kvCacheIterationStats") as err:
            backend(gemma_dir(tmp_path), max_seq_len="4096", **opts)
        assert "\n" not in str(err.value)


def test_one_window_reads_the_capacity_api_without_a_probe(standin, tmp_path):
    """The newest LLM has get_kv_cache_capacity(): read without running a request or draining the stats."""
    standin.BEHAVIOUR.update(kv_pool_tokens=1000, iteration_stats=False)
    b = backend(hf_dir(tmp_path), max_seq_len="4096")
    assert (b.kv_capacity, b.kv_blocks, b.kv_capacity_source) == (992, (31, 32), "allocated")
    standin.BEHAVIOUR.update(iteration_stats=True, kv_capacity_api=False)  # older: the probe and get_stats
    b = backend(hf_dir(tmp_path), max_seq_len="4096")
    assert (b.kv_capacity, b.kv_blocks, b.kv_capacity_source) == (992, (31, 32), "allocated")


def test_rows_show_the_deadline_rule_and_the_manifest_the_applied_deadlines(standin, tmp_path):
    """Issue 26 C: unset, request_timeout_s scales with the batch's prompt tokens; rows record the rule (not None)
    and info() the deadlines the batches got."""
    from evalctx.backends.trtllm.backend import TIMEOUT_BASE_S, TIMEOUT_PER_TOKEN_S

    b = backend(hf_dir(tmp_path))
    b.generate([request("a", "y" * 99)])
    cols = b.row_columns()
    assert cols["runtime_request_timeout_s"] is None  # scaled: the two rule columns say how
    assert (cols["runtime_request_timeout_base_s"], cols["runtime_request_timeout_per_token_s"]) == (
        TIMEOUT_BASE_S, TIMEOUT_PER_TOKEN_S)
    assert b.info()["request_deadlines_s"] == {"batches": 1, "min_s": 600.4, "max_s": 600.4}  # 100 tokens
    fixed = backend(hf_dir(tmp_path), request_timeout_s="30").row_columns()
    assert (fixed["runtime_request_timeout_s"], fixed["runtime_request_timeout_per_token_s"]) == (30.0, 0.0)
