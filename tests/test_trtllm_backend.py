"""The TensorRT-LLM backend against a stand-in ``tensorrt_llm`` written into a tmp dir for each test.

The stand-in's ``ModelRunnerCpp.from_dir`` / ``generate`` signatures copy the 1.2 reference (and an older variant
with some keywords missing); they record the keywords they get, reject unknown ones as the real class does, and
hand ranks other than 0 an object that fails the test if it is touched. The package never outlives a test.
"""

from __future__ import annotations

import json
import logging
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from evalctx.backends.base import BackendContext, parse_options
from evalctx.backends.trtllm.backend import TRTLLMBackend
from evalctx.errors import UsageError
from evalctx.records import GenerationRequest
from evalctx.tokenizer import ByteTokenizer

ENGINES = Path(__file__).parent / "data" / "engines"

FROM_DIR_PARAMS = [
    "lora_dir=None", "rank=0", "max_batch_size=None", "max_input_len=None", "max_output_len=None",
    "max_beam_width=None", "max_attention_window_size=None", "sink_token_length=None",
    "kv_cache_free_gpu_memory_fraction=None", "cross_kv_cache_fraction=None", "medusa_choices=None",
    "eagle_choices=None", "eagle_posterior_threshold=None", "eagle_use_dynamic_tree=False",
    "eagle_dynamic_tree_max_top_k=None", "lookahead_config=None", "debug_mode=False", "lora_ckpt_source='hf'",
    "use_gpu_direct_storage=False", "gpu_weights_percent=1", "max_tokens_in_paged_kv_cache=None",
    "kv_cache_enable_block_reuse=False", "enable_chunked_context=False", "is_enc_dec=False", "multi_block_mode=True",
    "enable_context_fmha_fp32_acc=None", "cuda_graph_mode=None", "logits_processor_map=None", "device_ids=None",
    "is_orchestrator_mode=False", "use_runtime_defaults=True", "gather_generation_logits=False",
    "use_variable_beam_width_search=False", "mm_embedding_offloading=False",
    "fail_fast_on_attention_window_too_large=False",
]
GENERATE_PARAMS = [
    "position_ids=None", "encoder_input_ids=None", "encoder_input_features=None", "encoder_output_lengths=None",
    "cross_attention_masks=None", "mrope_params=None", "sampling_config=None", "lora_uids=None",
    "lookahead_config=None", "streaming=False", "stopping_criteria=None", "logits_processor_names=None",
    "max_new_tokens=1", "end_id=None", "pad_id=None", "bad_words_list=None", "stop_words_list=None",
    "return_dict=False", "output_sequence_lengths=False", "output_generation_logits=False",
    "output_log_probs=False", "output_cum_log_probs=False", "prompt_table=None", "prompt_tasks=None",
    "input_token_extra_ids=None", "return_all_generated_tokens=False", "language_adapter_uids=None",
    "mm_embedding_offloading=False", "**kwargs",
]

RUNNER = '''
import functools, inspect, json
from pathlib import Path
import torch
import tensorrt_llm

FROM_DIR_CALLS, GENERATE_CALLS, GENERATE_INPUTS = [], [], []
BEHAVIOUR = {"answer": [35, 55, 53], "raise": None, "junk": 91}


class Untouchable:
    """What ranks other than 0 get back: any use fails the test."""
    def _fail(self, *args, **kwargs):
        raise AssertionError("a rank other than 0 touched generate() output")
    __getitem__ = __iter__ = __len__ = __bool__ = __getattr__ = _fail


def _recording(calls):
    def deco(fn):
        sig = inspect.signature(fn)
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            sig.bind(*args, **kwargs)  # an unknown keyword is a TypeError, as in the real class
            calls.append(dict(kwargs))
            return fn(*args, **kwargs)
        return wrapper
    return deco


class ModelRunnerCpp:
    def __init__(self, max_input_len, max_output_len):
        self.max_input_len, self.max_output_len = max_input_len, max_output_len

    @classmethod
    @_recording(FROM_DIR_CALLS)
    def from_dir(cls, engine_dir, *, FROM_DIR_PARAMS):
        kw = dict(locals())
        cfg = json.loads((Path(engine_dir) / "config.json").read_text())
        assert kw.get("rank") == tensorrt_llm._RANK, "rank != MPI session rank"
        seq = cfg["build_config"]["max_seq_len"]
        inp, out = kw.get("max_input_len") or 1024, kw.get("max_output_len")
        assert out is None or inp + out <= seq, "max_input_len + max_output_len > engine max_seq_len"
        return cls(inp, out or seq - inp)

    @_recording(GENERATE_CALLS)
    def generate(self, batch_input_ids, *, GENERATE_PARAMS):
        GENERATE_INPUTS.append([t.tolist() for t in batch_input_ids])
        if tensorrt_llm._RANK != 0:
            return Untouchable()
        if BEHAVIOUR["raise"] is not None:
            raise BEHAVIOUR["raise"]
        for t in batch_input_ids:
            assert t.dtype == torch.int32 and t.dim() == 1
        size = self.max_input_len + self.max_output_len
        out = torch.full((len(batch_input_ids), 1, size), BEHAVIOUR["junk"], dtype=torch.int32)
        lens = torch.zeros((len(batch_input_ids), 1), dtype=torch.int32)
        for b, t in enumerate(batch_input_ids):
            gen = BEHAVIOUR["answer"][:max_new_tokens]
            out[b, 0, :len(t)] = t
            out[b, 0, len(t):len(t) + len(gen)] = torch.tensor(gen, dtype=torch.int32)
            lens[b, 0] = len(t) + len(gen)
        final = {"output_ids": out, "sequence_lengths": lens}
        if not streaming:
            return final
        first = torch.tensor([[len(t) + 1] for t in batch_input_ids], dtype=torch.int32)
        return iter([{"output_ids": out, "sequence_lengths": first}, final])
'''

FILES = {
    "tensorrt_llm/__init__.py": "__version__ = 'VERSION'\n_RANK = 0\n\ndef mpi_rank():\n    return _RANK\n",
    "tensorrt_llm/_utils.py": "COMMS = []\n\ndef set_mpi_comm(new_comm):\n    COMMS.append(new_comm)\n",
    "tensorrt_llm/bindings/__init__.py": textwrap.dedent("""
        class MpiComm:
            calls = []
            @staticmethod
            def set_raw_mpi_session_by_fortran_handle(handle):
                MpiComm.calls.append(("set_raw", handle))
        """),
    "tensorrt_llm/runtime/__init__.py": "PYTHON_BINDINGS = True\nfrom .model_runner_cpp import ModelRunnerCpp\n",
}


def _purge() -> None:
    for name in [n for n in sys.modules if n == "tensorrt_llm" or n.startswith("tensorrt_llm.")]:
        del sys.modules[name]


@pytest.fixture
def stub(tmp_path, monkeypatch):
    """Install the stand-in; ``stub(version, drop=[...])`` leaves the named from_dir keywords out."""

    def install(version: str = "1.2.0", drop: tuple[str, ...] = (), rank: int = 0) -> SimpleNamespace:
        root = tmp_path / f"site-{version}"
        params = [p for p in FROM_DIR_PARAMS if p.split("=")[0] not in drop]
        runner = RUNNER.replace("FROM_DIR_PARAMS", ", ".join(params)).replace(
            "GENERATE_PARAMS", ", ".join(GENERATE_PARAMS))
        for rel, text in {**FILES, "tensorrt_llm/runtime/model_runner_cpp.py": runner}.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(text.replace("VERSION", version))
        monkeypatch.syspath_prepend(str(root))
        _purge()
        import tensorrt_llm
        import tensorrt_llm._utils
        import tensorrt_llm.bindings
        import tensorrt_llm.runtime.model_runner_cpp as mrc

        tensorrt_llm._RANK = rank
        return SimpleNamespace(pkg=tensorrt_llm, mrc=mrc, utils=tensorrt_llm._utils, bindings=tensorrt_llm.bindings)

    yield install
    _purge()


class FakeComm:
    def __init__(self, size: int, gathered: list[int] | None = None) -> None:
        self.size, self.gathered = size, gathered

    def Get_size(self) -> int:
        return self.size

    def allgather(self, value: int) -> list[int]:
        return self.gathered if self.gathered is not None else [value] * self.size

    def py2f(self) -> int:
        return 77


def make_engine(tmp_path: Path, tp: int = 1, pp: int = 1, **build: object) -> Path:
    data = json.loads((ENGINES / "v1" / "config.json").read_text())
    data["pretrained_config"]["mapping"].update(tp_size=tp, pp_size=pp, world_size=tp * pp)
    plugin = data["build_config"]["plugin_config"]
    for key, value in build.items():
        (plugin if key in plugin else data["build_config"])[key] = value
    path = tmp_path / f"engine-tp{tp}-pp{pp}"
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(data))
    return path


def backend(engine: Path, ctx: dict | None = None, **options: object) -> TRTLLMBackend:
    c = dict(model=str(engine), tokenizer=ByteTokenizer(), max_input_len=1000, max_new_tokens=8)
    c.update(ctx or {})
    return TRTLLMBackend(parse_options(TRTLLMBackend, options), BackendContext(**c))


def request(sid: str, text: str = "the passkey is", new: int = 8, **extra: object) -> GenerationRequest:
    ids = ByteTokenizer().encode(text, add_special_tokens=True)
    return GenerationRequest(sample_id=sid, prompt_ids=ids, prompt=text, max_new_tokens=new, extra=dict(extra))


def test_from_dir_gets_exact_kwargs_and_version_is_recorded(stub, tmp_path, caplog):
    s = stub("1.2.0")
    engine = make_engine(tmp_path)
    with caplog.at_level(logging.WARNING, "evalctx.backends.trtllm"):
        b = backend(engine, enable_chunked_context="true", max_tokens_in_paged_kv_cache="1100000")
    assert s.mrc.FROM_DIR_CALLS == [dict(
        engine_dir=str(engine), rank=0, max_batch_size=1, max_input_len=1000, max_output_len=8, max_beam_width=1,
        kv_cache_free_gpu_memory_fraction=0.9, kv_cache_enable_block_reuse=False, enable_chunked_context=True,
        fail_fast_on_attention_window_too_large=True, max_tokens_in_paged_kv_cache=1_100_000)]
    assert not caplog.records
    info = b.info()
    assert info["tensorrt_llm_version"] == "1.2.0" and info["dropped_kwargs"] == {"from_dir": [], "generate": []}
    json.dumps(info)
    cols = b.row_columns()
    assert cols["tensorrt_llm_version"] == "1.2.0" and cols["engine_max_seq_len"] == 1_048_576
    assert cols["runtime_max_input_len"] == 1000 and cols["runtime_enable_chunked_context"] is True
    assert cols["runtime_kv_cache_enable_block_reuse"] is False


def test_generate_passes_int32_ids_and_slices_with_sequence_lengths(stub, tmp_path):
    s = stub()
    b = backend(make_engine(tmp_path))
    reqs = [request("a"), request("b", "x" * 40, new=2)]
    out = b.generate(reqs)
    # the stand-in fills past sequence_lengths with junk ('X'): only slicing by length gives the answer
    assert [r.text for r in out] == [" 42", " 4"]
    assert [r.n_output_tokens for r in out] == [3, 2] and [r.finish_reason for r in out] == ["stop", "length"]
    assert [r.n_prompt_tokens for r in out] == [len(r.prompt_ids) for r in reqs]
    assert all(r.error is None and r.latency_s is not None and r.ttft_s is None for r in out)
    calls = s.mrc.GENERATE_CALLS
    assert len(calls) == 2  # one call per max_new_tokens
    assert s.mrc.GENERATE_INPUTS == [[reqs[0].prompt_ids], [reqs[1].prompt_ids]]  # as given: no re-tokenization
    assert calls[0] == dict(max_new_tokens=8, end_id=2, pad_id=2, temperature=1.0, top_k=1, top_p=0.0, num_beams=1,
                            output_sequence_lengths=True, return_dict=True, streaming=False)


def test_rank_one_gets_nothing_back_and_does_not_touch_it(stub, tmp_path):
    s = stub(rank=1)
    b = backend(make_engine(tmp_path, tp=2), dict(world_rank=1, world_size=2, rank_in_replica=1,
                                                  replica_comm=FakeComm(2)))
    assert s.mrc.FROM_DIR_CALLS[0]["rank"] == 1 and "device_ids" not in s.mrc.FROM_DIR_CALLS[0]
    out = b.generate([request("a"), request("b")])
    # followers still call generate (the collectives need every rank), in max_batch_size (1) pieces
    assert len(s.mrc.GENERATE_CALLS) == 2
    assert [(r.text, r.error) for r in out] == [(None, None), (None, None)]
    b.options.streaming_ttft = True
    assert [r.text for r in b.generate([request("c")])] == [None]  # the stream is not iterated either


def test_world_must_equal_tp_times_pp_before_loading(stub, tmp_path):
    s = stub()
    with pytest.raises(UsageError, match=r"tp 2 x pp 2 x cp 1 = 4 ranks but this replica has 2.*mpirun -n 4"):
        backend(make_engine(tmp_path, tp=2, pp=2), dict(world_size=2, replica_comm=FakeComm(2)))
    assert s.mrc.FROM_DIR_CALLS == []
    assert TRTLLMBackend.ranks_per_replica(TRTLLMBackend.Options(), str(make_engine(tmp_path, tp=2, pp=2))) == 4


def test_missing_tensorrt_llm_says_how_to_install(tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorrt_llm") is not None:
        pytest.skip("a real tensorrt_llm is installed")
    with pytest.raises(UsageError, match=r"pip install 'evalctx\[trtllm\]'"):
        backend(make_engine(tmp_path))


def test_older_release_drops_missing_kwargs_with_a_warning(stub, tmp_path, caplog):
    drop = ("fail_fast_on_attention_window_too_large", "multi_block_mode", "kv_cache_enable_block_reuse")
    s = stub("0.12.0", drop=drop)
    with caplog.at_level(logging.WARNING, "evalctx.backends.trtllm"):
        b = backend(make_engine(tmp_path), multi_block_mode="true")
    assert not set(drop) & set(s.mrc.FROM_DIR_CALLS[0])
    text = " ".join(r.getMessage() for r in caplog.records)
    assert all(name in text for name in drop) and "0.12.0" in text
    assert sorted(b.info()["dropped_kwargs"]["from_dir"]) == sorted(drop)
    assert b.row_columns()["runtime_multi_block_mode"] is None  # not applied, so not recorded as applied
    assert b.generate([request("a")])[0].text == " 42"


def test_release_without_runtime_max_input_len_is_refused(stub, tmp_path):
    stub("0.9.0", drop=("max_input_len",))
    with pytest.raises(UsageError, match="max_input_len"):
        backend(make_engine(tmp_path))


def test_runtime_max_input_len_is_clamped_and_long_samples_are_unsupported(stub, tmp_path):
    s = stub()
    engine = make_engine(tmp_path, max_seq_len=2048, max_num_tokens=4096)
    b = backend(engine, dict(max_input_len=5000, max_new_tokens=16))
    kw = s.mrc.FROM_DIR_CALLS[0]
    assert (kw["max_input_len"], kw["max_output_len"]) == (2032, 16)
    specs = [SimpleNamespace(id="short", context_length=1000, max_new_tokens=16),
             SimpleNamespace(id="long", context_length=5000, max_new_tokens=16)]
    unsupported = b.preflight(specs)
    assert list(unsupported) == ["long"] and "--max_seq_len" in unsupported["long"]
    too_long = GenerationRequest(sample_id="x", prompt_ids=[5] * 2040, prompt="", max_new_tokens=16)
    out = b.generate([too_long, request("ok", new=16)])
    assert "max_input_len 2032" in out[0].error and out[1].text == " 42"
    assert s.mrc.GENERATE_INPUTS == [[request("ok").prompt_ids]]  # the long one was not cut and sent


def test_preflight_without_paged_context_fmha(stub, tmp_path):
    stub()
    b = backend(make_engine(tmp_path, use_paged_context_fmha=False), dict(max_input_len=6000),
                enable_chunked_context="true")
    assert b.row_columns()["runtime_enable_chunked_context"] is False
    specs = [SimpleNamespace(id="a", context_length=5000, max_new_tokens=8)]
    assert "no paged context FMHA" in b.preflight(specs)["a"]


def test_streaming_ttft(stub, tmp_path):
    s = stub()
    b = backend(make_engine(tmp_path), streaming_ttft="true")
    (r,) = b.generate([request("a")])
    assert r.text == " 42" and r.ttft_s is not None and 0 <= r.ttft_s <= r.latency_s
    assert s.mrc.GENERATE_CALLS[0]["streaming"] is True


def test_lora_uids_are_strings(stub, tmp_path):
    s = stub()
    b = backend(make_engine(tmp_path, lora_plugin="float16", max_batch_size=4), lora_dir="/adapters/a",
                max_batch_size="2")
    assert s.mrc.FROM_DIR_CALLS[0]["lora_dir"] == ["/adapters/a"]
    assert s.mrc.FROM_DIR_CALLS[0]["lora_ckpt_source"] == "hf"
    b.generate([request("a", lora_task_uid=0), request("b"), request("c")])
    # batches of 2 at most; a batch where no request names an adapter passes no lora_uids at all
    assert [c.get("lora_uids") for c in s.mrc.GENERATE_CALLS] == [["0", "-1"], None]
    assert b.generate([request("d", lora_task_uid="1")])[0].text == " 42"


def test_batch_error_becomes_error_rows_but_cuda_errors_propagate(stub, tmp_path):
    s = stub()
    b = backend(make_engine(tmp_path))
    s.mrc.BEHAVIOUR["raise"] = RuntimeError("Encountered an error when fetching new request: bad length\nmore")
    out = b.generate([request("a"), request("b")])
    assert all(r.text is None and r.error == "RuntimeError: Encountered an error when fetching new request: "
               "bad length" for r in out)
    s.mrc.BEHAVIOUR["raise"] = RuntimeError("[TensorRT-LLM][ERROR] CUDA runtime error in cudaMemcpy: illegal "
                                            "memory access")
    with pytest.raises(RuntimeError, match="illegal memory access"):
        b.generate([request("c")])


def test_several_replicas_split_the_session_and_pin_gpus(stub, tmp_path, monkeypatch):
    s = stub(rank=1)
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "3")
    comm = FakeComm(2, gathered=[2, 3])
    backend(make_engine(tmp_path, tp=2), dict(world_rank=3, world_size=4, replica=1, rank_in_replica=1,
                                              replica_comm=comm))
    assert s.utils.COMMS == [comm] and s.bindings.MpiComm.calls == [("set_raw", 77)]
    kw = s.mrc.FROM_DIR_CALLS[0]
    assert kw["rank"] == 1 and kw["device_ids"] == [2, 3]


def test_the_stub_does_not_leak():
    import importlib.util

    assert "tensorrt_llm" not in sys.modules
    assert not any(n.startswith("tensorrt_llm.") for n in sys.modules)
    assert importlib.util.find_spec("tensorrt_llm") is None or "site-" not in str(
        importlib.util.find_spec("tensorrt_llm").origin)
