"""KV memory as models use it (issue 25): sliding-window and chunked-attention layers hold only their window, fp8
and int8 KV caches; answers stay the model's own (window) or differ only by quantization (fp8/int8), and what the
memory preflight and ``evalctx plan`` count is what the cache allocates."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from evalctx.backends.base import BackendContext  # noqa: E402
from evalctx.backends.hf import families  # noqa: E402
from evalctx.backends.hf.backend import HFBackend  # noqa: E402
from evalctx.backends.hf.cache import PreallocatedLayer, WindowLayer  # noqa: E402
from evalctx.backends.base import parse_options  # noqa: E402
from evalctx.cli import main  # noqa: E402
from evalctx.capacity.kv_layout import layer_windows, window_positions  # noqa: E402
from evalctx.capacity.memory import hf_rank_memory  # noqa: E402
from evalctx.capacity.plan import shape_from_hf  # noqa: E402
from evalctx.records import GenerationRequest  # noqa: E402
from evalctx.models.tokenizer import load_tokenizer  # noqa: E402

WINDOW = 16
WINDOWED = [f.name for f in families.FAMILIES if layer_windows({**families._BASE, **f.config}) not in (None,)
            and any(w is not None for w in layer_windows({**families._BASE, **f.config}) or ())]


def _small_window(name: str, dest: Path) -> Path:
    """The family's model with its windows (sliding or chunked) shrunk to WINDOW positions."""
    fam = families.by_name(name)
    key = "attention_chunk_size" if "attention_chunk_size" in fam.config else "sliding_window"
    return families.build(dataclasses.replace(fam, config={**fam.config, key: WINDOW}), dest)


def _backend(path: Path, **opts: object) -> HFBackend:
    options = parse_options(HFBackend, {"device": "cpu", **{k: str(v) for k, v in opts.items()}})
    return HFBackend(options, BackendContext(model=str(path), tokenizer=load_tokenizer(str(path))))


def test_the_windowed_families_are_the_ones_with_windows() -> None:
    assert set(WINDOWED) == {"mistral", "gemma2", "gemma3", "gpt-oss", "cohere2", "llama4", "olmo3"}


@pytest.mark.parametrize("family", WINDOWED)
def test_window_layers_answer_as_generate_with_reuse_and_batches(family: str, tmp_path: Path) -> None:
    """Windows of 16 at 100 and 300 tokens in chunks of 32: window layers compact many times, snapshot every chunk
    boundary for prefix reuse, and every answer is still the model's own generate's."""
    model = _small_window(family, tmp_path / family)
    out = tmp_path / "m.md"
    assert main(["conformance", "--model", str(model), "--lengths", "100", "300", "--chunk-sizes", "32",
                 "--markdown", str(out)]) == 0
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.read_text().splitlines()[2:]]
    assert len(rows) == 8 and all(r[-1] == "ok" and r[5] == "6/6" for r in rows), rows
    assert all(int(r[8]) > 0 for r in rows if r[2] == "on")  # reuse served tokens through the snapshots

    backend = _backend(model, chunk_size=32, prefix_reuse="true")
    cache = backend.new_cache(316, 1)
    kinds = [type(layer) for layer in cache.layers]
    windows = backend.kv_windows
    assert windows is not None
    assert kinds == [PreallocatedLayer if w is None else WindowLayer for w in windows]


def _ids(backend: HFBackend, n: int, seed: int = 0) -> list[int]:
    from evalctx.tasks import get_task

    return get_task("passkey")(backend.ctx.tokenizer, {}).make_sample(n, 0.5, seed).prompt_ids


def test_the_cache_holds_what_the_preflight_counts(tmp_path: Path) -> None:
    """Per layer kind, the bytes the cache allocates are the bytes hf_rank_memory counts (exactly without reuse;
    with reuse the count is an upper bound on the snapshots a prompt takes)."""
    model = _small_window("gemma3", tmp_path / "g3")
    shape = shape_from_hf(json.loads((model / "config.json").read_text()))
    for reuse in (False, True):
        backend = _backend(model, chunk_size=32, prefix_reuse=str(reuse).lower(), dtype="float32")
        n, budget = 300, 8
        backend.generate([GenerationRequest(sample_id="a", prompt_ids=_ids(backend, n), prompt="",
                                            max_new_tokens=budget)])
        held = backend._cache.held_bytes()
        counted = hf_rank_memory(shape, n + budget, chunk=32, dtype="fp32", windows=backend.kv_windows,
                                 reuse_every=32 if reuse else 0).kv_cache
        full = hf_rank_memory(shape, n + budget, chunk=32, dtype="fp32").kv_cache
        if reuse:
            assert held <= counted < full
        else:
            assert held == counted
            assert held < 0.6 * full  # 2 of 3 layers hold 47 of 308 positions


@pytest.mark.parametrize("kv_dtype", ["fp8", "int8", "fp8_tensor"])
def test_a_quantized_kv_cache_is_close_stores_less_and_is_exact_under_reuse_and_chunking(kv_dtype: str) -> None:
    """fp8/int8 with per token-head scales: first-token logits within a few percent of the model dtype's, half the
    bytes or less (fp32 model: a quarter plus scales), and the same answers whatever the chunking and reuse (the
    quantization of a position does not depend on its chunk)."""
    from evalctx.models.embedded import resolve_model

    path = resolve_model("tiny").path
    ref = _backend(path, chunk_size=64)
    reqs = [GenerationRequest(sample_id=str(s), prompt_ids=_ids(ref, 400, s), prompt="", max_new_tokens=8)
            for s in range(3)]
    base = [ref.generate([r])[0] for r in reqs]
    base_logits = ref.last_prefill_logits
    runs = {}
    for chunk, reuse in ((64, "false"), (64, "true"), (0, "false"), (100, "true")):
        opts = {"kv_dtype": "fp8", "kv_scale": "tensor"} if kv_dtype == "fp8_tensor" else {"kv_dtype": kv_dtype}
        engine = _backend(path, chunk_size=chunk, prefix_reuse=reuse, **opts)
        runs[(chunk, reuse)] = [engine.generate([r])[0] for r in reqs]
        if (chunk, reuse) == (64, "false"):
            err = float((engine.last_prefill_logits - base_logits).norm() / base_logits.norm())
            assert 0 < err < 0.1, err
            layer = engine._cache.layers[0]
            assert layer.store.k.dtype == (torch.int8 if kv_dtype == "int8" else torch.float8_e4m3fn)
            assert engine._cache.held_bytes() < 0.3 * ref._cache.held_bytes()
            assert engine.info()["kv_dtype"] == kv_dtype and engine.row_columns()["hf_kv_dtype"] == kv_dtype
    texts = {key: [r.text for r in rows] for key, rows in runs.items()}
    assert len({tuple(t) for t in texts.values()}) == 1, texts
    assert sum(r.n_cached_prompt_tokens for r in runs[(64, "true")]) > 0
    # tiny finds its passkeys with the quantized cache as with the full-precision one
    assert [r.text for r in base] == texts[(64, "false")]


def test_kv_dtype_spellings_and_a_bad_one(tmp_path: Path) -> None:
    from evalctx.backends.hf.backend import _kv_format
    from evalctx.errors import UsageError

    assert _kv_format("auto", "token", "bf16") is None and _kv_format("FP8", "token", "bf16") == "fp8"
    assert _kv_format("e4m3", "token", "bf16") == "fp8" and _kv_format("int8", "token", "fp32") == "int8"
    assert _kv_format("bfloat16", "token", "bf16") is None  # the model dtype, named
    assert _kv_format("fp8", "tensor", "bf16") == "fp8_tensor"
    with pytest.raises(UsageError, match="kv_dtype='fp4' is not one of auto"):
        _kv_format("fp4", "token", "bf16")
    with pytest.raises(UsageError, match=r"kv_dtype='fp16' is not one of auto \(the model dtype, bf16\)"):
        _kv_format("fp16", "token", "bf16")
    with pytest.raises(UsageError, match="kv_scale=tensor is fp8's"):
        _kv_format("int8", "tensor", "bf16")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_quantizing_leaves_the_models_tensors_alone_and_reads_back_small_vectors(dtype: str) -> None:
    from evalctx.backends.hf.cache import PreallocatedLayer

    dt = getattr(torch, dtype)
    keys = torch.randn(1, 2, 5, 16).to(dt)
    keys[0, 0, 0] = 1e-6  # a vector whose scale underflows fp16
    values = torch.randn(1, 2, 5, 16).to(dt)
    before = keys.clone(), values.clone()
    layer = PreallocatedLayer(8, "fp8")
    k, v = layer.update(keys, values)
    assert torch.equal(keys, before[0]) and torch.equal(values, before[1])
    assert float(k[0, 0, 0].float().abs().min()) > 0  # read back through float32, not a zero scale
    rel = float((k.float() - keys.float()).norm() / keys.float().norm())
    assert rel < 0.05, rel


def test_the_load_probe_exercises_window_layers(tmp_path: Path) -> None:
    """Windows up to the device's cap are probed past the window (the layers compact and pass an offset)."""
    from evalctx.backends.hf.support import probe_length

    model = families.build(dataclasses.replace(families.by_name("gemma3"),
                                               config={**families.by_name("gemma3").config, "sliding_window": 64}),
                           tmp_path / "g3")
    backend = _backend(model)
    assert probe_length(backend)[0] == 64 + 48
    assert "window layers of 64 exercised" in backend.forward_check
    big = _backend(_small_window("gemma3", tmp_path / "w16"))
    assert "window layers of 16 exercised" in big.forward_check


def test_conformance_refuses_a_quantized_cache(capsys: pytest.CaptureFixture) -> None:
    assert main(["conformance", "--model", "tiny", "--backend-opt", "kv_dtype=fp8"]) == 2
    assert "a quantized KV cache differs by design" in capsys.readouterr().err


def test_window_positions_arithmetic() -> None:
    assert window_positions(None, 1000, step=64) == 1000
    assert window_positions(128, 100_000, step=4096) == 127 + 4096
    assert window_positions(128, 100_000, step=0) == 100_000  # the whole prompt in one step: whole
    assert window_positions(128, 100_000, step=4096, reuse_every=4096) == 127 + 4096 + 127 * (99_999 // 4096)
    assert window_positions(4096, 8000, step=4096) == 8000  # never more than the sequence


def test_layer_windows_follow_transformers_reading() -> None:
    from transformers.cache_utils import get_layer_types_and_kwargs

    from evalctx.backends.hf.cache import model_windows

    for fam in families.FAMILIES:
        cfg = getattr(transformers, fam.config_class)(**{**families._BASE, **fam.config})
        types, kwargs = get_layer_types_and_kwargs(cfg)
        expected = tuple(None if t == "full_attention" else kw["sliding_window"] for t, kw in zip(types, kwargs))
        assert layer_windows(cfg.to_dict()) == expected == model_windows(cfg), fam.name
    # A Qwen2 config that names a window but does not use it is full attention.
    assert layer_windows({"num_hidden_layers": 2, "sliding_window": 4096, "use_sliding_window": False}) == (None,
                                                                                                           None)
    assert layer_windows({"num_hidden_layers": 2, "layer_types": ["mamba", "full_attention"]}) is None
    assert layer_windows({"num_hidden_layers": 2, "num_kv_shared_layers": 1}) is None


GEMMA3_4B = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": 2560,
             "intermediate_size": 10240, "num_hidden_layers": 24, "num_attention_heads": 8, "num_key_value_heads": 4,
             "head_dim": 256, "vocab_size": 262144, "sliding_window": 512, "max_position_embeddings": 131072,
             "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 4}


def test_plan_counts_the_kv_cache_per_layer_kind(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(GEMMA3_4B))
    assert main(["plan", "--backend", "hf", "--config", str(cfg), "--context", "131072", "--json"]) == 0
    bf16 = json.loads(capsys.readouterr().out)
    groups = bf16["per_rank"]["kv_groups"]
    assert [(g["kind"], g["layers"], g["positions"]) for g in groups] == [("full", 4, 131072),
                                                                          ("window 512", 20, 511 + 4096)]
    per_pos = 2 * 4 * 256 * 2
    assert bf16["per_rank"]["kv_cache"] == per_pos * (4 * 131072 + 20 * 4607)
    assert main(["plan", "--backend", "hf", "--config", str(cfg), "--context", "131072", "--json",
                 "--kv-dtype", "fp8"]) == 0
    fp8 = json.loads(capsys.readouterr().out)
    assert fp8["kv_dtype"] == "fp8"
    assert fp8["per_rank"]["kv_cache"] == (2 * 4 * (256 + 4)) * (4 * 131072 + 20 * 4607)
    assert main(["plan", "--backend", "hf", "--config", str(cfg), "--context", "131072"]) == 0
    text = capsys.readouterr().out
    assert "window 512      20 layers x       4,607 positions" in text and "holds 0.20x" in text
    assert main(["plan", "--backend", "hf", "--config", str(cfg), "--context", "1000", "--kv-dtype", "fp16"]) == 2
    assert "fp8 or int8, not fp16" in capsys.readouterr().err
    assert main(["plan", "--backend", "hf", "--config", str(cfg), "--context", "131072", "--json",
                 "--kv-dtype", "fp8", "--kv-scale", "tensor"]) == 0
    unscaled = json.loads(capsys.readouterr().out)
    assert unscaled["per_rank"]["kv_cache"] == (2 * 4 * 256) * (4 * 131072 + 20 * 4607)  # no scales stored
    assert main(["plan", "--backend", "hf", "--config", str(cfg), "--context", "1000", "--prefix-reuse",
                 "--chunk-size", "0"]) == 2
    assert "reuses whole prefill chunks" in capsys.readouterr().err


def test_the_check_fails_when_a_window_layer_misplaces_its_keys(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A window layer that reported its keys as starting at position 0 would have the model's mask hide the wrong
    ones: the load-time probe (48 tokens in chunks of 16, past the window of 16) refuses the engine."""
    real = WindowLayer.get_mask_sizes
    monkeypatch.setattr(WindowLayer, "get_mask_sizes", lambda self, q: (real(self, q)[0], 0))
    model = _small_window("gemma3", tmp_path / "g3")
    out = tmp_path / "m.md"
    assert main(["conformance", "--model", str(model), "--lengths", "300", "--chunk-sizes", "32",
                 "--batch-sizes", "1", "--prefix-reuse", "off", "--markdown", str(out)]) == 2
    assert "does not reproduce g3's own forward" in capsys.readouterr().err


def test_the_report_shows_the_kv_cache_dtype_and_layout() -> None:
    from evalctx.report.metadata import settings_table

    manifest = {"backend": {"backend": "hf", "kv_dtype": "fp8",
                            "kv_layout": "full: 1 layers x 1,056 positions; window 64: 5 layers x 319 positions (fp8)"}}
    table = settings_table([("fp8", manifest), ("bf16", {"backend": {"backend": "hf", "kv_dtype": "bf16"}})])
    table = table.set_index("field")
    assert table.loc["KV cache dtype", "fp8"] == "fp8" and table.loc["KV cache dtype", "bf16"] == "bf16"
    assert "window 64: 5 layers" in table.loc["KV cache layout", "fp8"]
