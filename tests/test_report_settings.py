"""The report shows the settings a run actually used (what "auto" became), the rope facts under transformers 4.x
and 5.x alike, and, for two real runs of the embedded model (tiny vs tiny-rope-linear), results before metadata,
the difference heatmap and the wrong answers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from evalctx.models.model_facts import rope_facts, rope_text
from evalctx.report.metadata import settings_table

# A 4.x config.to_dict(), a 5.x one, and the model_config evalctx wrote under 5.x before it read rope_parameters.
V4 = {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                               "original_max_position_embeddings": 8192}}
V5 = {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}}
OLD_MANIFEST = {"rope_theta": None, "rope_scaling": {"factor": 4.0, "rope_theta": 10000.0, "rope_type": "linear"}}
PER_LAYER = {"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                 "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}


@pytest.mark.parametrize(("config", "theta", "scaling"), [
    (V4, 500000.0, {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192}),
    (V5, 10000.0, {"rope_type": "linear", "factor": 4.0}),
    (OLD_MANIFEST, 10000.0, {"rope_type": "linear", "factor": 4.0}),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e5}}, 1e5, {"rope_type": "default"}),
    ({"rope_theta": 1e4, "rope_scaling": None}, 1e4, None),
    (PER_LAYER, {"full_attention": 1e6, "sliding_attention": 1e4},
     {"full_attention": {"rope_type": "linear", "factor": 8.0}, "sliding_attention": {"rope_type": "default"}}),
    ({"max_position_embeddings": 1024}, None, None),  # learned positions (GPT-2): no rope at all
])
def test_rope_facts(config: dict, theta: object, scaling: object) -> None:
    assert rope_facts(config) == {"rope_theta": theta, "rope_scaling": scaling}


def test_rope_text() -> None:
    assert rope_text(None) == "none" and rope_text({"rope_type": "default"}) == "none"
    assert rope_text({"rope_type": "linear", "factor": 4.0}) == "linear, factor 4"
    assert rope_text(V4["rope_scaling"]) == "llama3, factor 8, original_max_position_embeddings 8192"
    assert rope_text(rope_facts(PER_LAYER)["rope_scaling"]) == \
        "full_attention: linear, factor 8; sliding_attention: none"


def _hf_manifest(model_config: dict) -> dict:
    return {"backend": {"backend": "hf", "model": "m", "device": "cuda:0", "dtype": "bfloat16",
                        "attn_implementation": "evalctx_sdpa", "attention_kernels": "flash (decode)", "tp": 2,
                        "gpu": "NVIDIA H200", "model_config": model_config,
                        "options": {"dtype": "auto", "device": "auto", "attn_implementation": "auto", "tp": 2,
                                    "chunk_size": 8192}},
            "world": {"size": 4, "replicas": 2, "ranks_per_replica": 2}, "batch_size": 1,
            "suite": {"tasks": [{"task": "passkey", "prompt_mode": "raw", "max_new_tokens": 8}]}}


def test_settings_are_the_resolved_ones_not_auto() -> None:
    table = settings_table([("old", _hf_manifest(OLD_MANIFEST)), ("new", _hf_manifest(V5))]).set_index("field")
    assert table.loc["device", "old"] == "cuda:0" and table.loc["dtype", "old"] == "bfloat16"
    assert table.loc["attention", "old"] == "evalctx_sdpa (flash (decode))"
    assert table.loc["tensor parallel (tp)", "old"] == 2 and table.loc["replicas", "old"] == "2 replicas of 2 ranks"
    assert table.loc["chunked prefill", "old"] == "8192 tokens per chunk"
    # The manifest evalctx wrote under transformers 5 before this fix reads the same as the fixed one.
    for label in ("old", "new"):
        assert table.loc["rope_theta", label] == 10000 and table.loc["rope scaling", label] == "linear, factor 4"
    assert not (table[["old", "new"]] == "auto").any().any()
    assert "KV cache dtype" not in table.index  # no run has one: the row is left out


def test_settings_of_a_tensorrt_llm_engine(tmp_path: Path) -> None:
    from run_fixtures import write_run

    m = json.loads((write_run(tmp_path, "e", engine={"dtype": "float16", "kv_dtype": "fp8", "tp": 4, "pp": 2,
                                                     "rotary_base": 500000.0, "max_position_embeddings": 131072},
                              tasks=("passkey",), lengths=(4096,), samples=1) / "manifest.json").read_text())
    table = settings_table([("e", m)]).set_index("field")["e"]
    assert table["dtype"] == "float16" and table["KV cache dtype"] == "fp8"
    assert table["tensor parallel (tp)"] == 4 and table["pipeline parallel (pp)"] == 2
    assert table["rope_theta"] == 500000 and table["max_position_embeddings"] == 131072
    assert "rope scaling" not in table.index and "device" not in table.index


# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two real hf runs of the embedded model: tiny (finds the needle at 256 tokens) and tiny-rope-linear (the
    same weights with linear RoPE scaling x4, which it was never trained for: it fails)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    from evalctx.cli import main

    root = tmp_path_factory.mktemp("tiny_pair")
    suite = root / "s.toml"
    suite.write_text('name = "s"\n[[tasks]]\ntask = "passkey"\nlengths = [256]\ndepths = [0.0, 1.0]\nsamples = 2\n'
                     'max_new_tokens = 8\n[tasks.options]\ntemplate = "trtllm"\nhaystack = "noise"\n')
    for model in ("tiny", "tiny-rope-linear"):
        assert main(["run", "--suite", str(suite), "--backend", "hf", "--model", model, "--out", str(root),
                     "--run-id", model, "--no-progress", "--backend-opt", "threads=1"]) == 0
    return root / "tiny", root / "tiny-rope-linear"


def test_hf_manifest_records_rope_theta_under_transformers_5(tiny_pair: tuple[Path, Path]) -> None:
    for run, scaling in zip(tiny_pair, ({"rope_type": "default"}, {"rope_type": "linear", "factor": 4.0})):
        mc = json.loads((run / "manifest.json").read_text())["backend"]["model_config"]
        assert mc["rope_theta"] == 10000.0 and mc["rope_scaling"] == scaling


def test_report_of_two_real_runs(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    from evalctx.report import write_report

    _, md_path = write_report(list(tiny_pair), tmp_path)
    md = md_path.read_text(encoding="utf-8")
    headings = re.findall(r"^## (.+)$", md, re.M)
    assert headings.index("Effective length") == 0 and headings.index("Heatmaps") < headings.index("Settings used")
    assert "| passkey | tiny | 100.0% (n=4) | ≥256 | ≥256 |" in md
    assert "| passkey | tiny-rope-linear | 0.0% (n=4) | <256 | <256 |" in md
    settings = md[md.index("## Settings used"):md.index("## Runs")]
    for row in ("| device | cpu | cpu |  |", "| dtype | float32 | float32 |  |", "| attention | sdpa | sdpa |  |",
                "| rope scaling | none | linear, factor 4 | yes |", "| rope_theta | 10000 | 10000 |  |"):
        assert row in settings, settings
    assert "| auto" not in settings
    assert "| options.dtype | auto → float32 | auto → float32 |  |" in md
    assert "(plots/difference_passkey_tiny-rope-linear-vs-tiny.png)" in md
    wrong = md[md.index("## Wrong answers"):md.index("## Latency")]
    assert wrong.count("| tiny-rope-linear | passkey | 256 |") == 4 and "| tiny | passkey" not in wrong
