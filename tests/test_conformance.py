"""The hf engine answers as the model itself: every family's random-weight model against its own ``generate`` in
every combination (``evalctx conformance``), the issue's five examples on copies of the trained tiny model, and
proof that the check fails when the engine is wrong. tp=2 under mpirun: tests/test_conformance_tp.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from evalctx.backends.hf import families  # noqa: E402
from evalctx.cli import main  # noqa: E402
from evalctx.models.embedded import resolve_model  # noqa: E402


def _matrix(path: Path) -> list[list[str]]:
    rows = [line.strip("|").split("|") for line in path.read_text().splitlines()[2:]]
    return [[c.strip() for c in row] for row in rows]


@pytest.mark.parametrize("family", [f.name for f in families.FAMILIES])
def test_family_answers_as_its_own_generate_in_every_combination(family: str, tmp_path: Path) -> None:
    out = tmp_path / "matrix.md"
    assert main(["conformance", "--family", family, "--markdown", str(out)]) == 0
    rows = _matrix(out)
    # chunk_size whole / 48 (crosses the 128-token thresholds mid-chunk) / the default 4096; prefix reuse on and
    # off; batch 1 and 3; lengths 100 and 300 on both sides of every threshold.
    assert len(rows) == 20
    assert {r[1] for r in rows} == {"whole", "48", "4096"} and {r[4] for r in rows} == {"100", "300"}
    assert all(r[-1] == "ok" and r[5] == "6/6" for r in rows), rows
    reused = [int(r[8]) for r in rows if r[1] == "48" and r[2] == "on"]
    assert all(n > 0 for n in reused)  # prefix reuse really served tokens from the cache, batch 1 and 3


def test_the_check_fails_when_chunks_are_rotated_apart(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without the whole-prompt rotation, dynamic NTK and LongRoPE answer differently once a prompt crosses their
    original window in chunks (the issue's first two examples); the matrix must say so and exit 1."""
    from evalctx.backends.hf.rope import PromptRope

    monkeypatch.setattr(PromptRope, "start_prompt", lambda self, n: self.reset())
    out = tmp_path / "m.md"
    assert main(["conformance", "--family", "dynamic-ntk,phi3-longrope", "--chunk-sizes", "0", "48",
                 "--batch-sizes", "1", "--prefix-reuse", "off", "--markdown", str(out)]) == 1
    rows = {(r[0], r[1], r[4]): r[-1] for r in _matrix(out)}
    for fam in ("dynamic-ntk", "phi3-longrope"):
        assert rows[(fam, "whole", "300")] == "ok" and rows[(fam, "48", "100")] == "ok"
        assert rows[(fam, "48", "300")] == "DIFFERS"


def test_the_check_fails_when_a_prefix_is_reused_across_rotations(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    """LongRoPE rotates a 300-token prompt's keys with its long factors, a 100-token one's with the short ones:
    reusing the cached prefix across the two would be wrong, and the engine must not do it."""
    from evalctx.backends.hf.rope import PromptRope

    monkeypatch.setattr(PromptRope, "same_rotation", lambda self, a, b, upto: True)
    out = tmp_path / "m.md"
    assert main(["conformance", "--family", "phi3-longrope", "--chunk-sizes", "16", "--batch-sizes", "1",
                 "--prefix-reuse", "on", "--markdown", str(out)]) == 1
    rows = {r[4]: r[-1] for r in _matrix(out)}
    assert rows == {"300": "ok", "100": "DIFFERS"}


def test_rope_rotation_follows_the_prompt_length_only_where_the_type_says(tmp_path: Path) -> None:
    from evalctx.backends.base import BackendContext, parse_options
    from evalctx.backends.hf import HFBackend
    from evalctx.models.tokenizer import load_tokenizer

    for name, same in (("llama", True), ("llama3.1", True), ("qwen2.5-yarn", True), ("dynamic-ntk", False),
                       ("phi3-longrope", False)):
        path = families.build(families.by_name(name), tmp_path / name)
        backend = HFBackend(parse_options(HFBackend, {"device": "cpu"}),
                            BackendContext(model=str(path), tokenizer=load_tokenizer(path)))
        assert backend.rope.same_rotation(300, 100, 96) is same, name
        assert backend.rope.same_rotation(100, 120, 96)  # both inside the original window: one rotation


# --- the five examples, on copies of the trained tiny model -------------------------------------------

def _tiny_copy(dest: Path, **config: object) -> Path:
    src = resolve_model("tiny").path
    shutil.copytree(src, dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg.update(config)
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


SUITE = """
name = "ex"
[[tasks]]
task = "passkey"
lengths = [2048]
depths = [0.2, 0.6, 1.0]
samples = 2
max_new_tokens = 8
"""


def _run(tmp_path: Path, model: Path, run_id: str, *opts: str) -> pd.DataFrame:
    (tmp_path / "s.toml").write_text(SUITE)
    args = ["run", "--suite", str(tmp_path / "s.toml"), "--backend", "hf", "--model", str(model), "--out",
            str(tmp_path), "--run-id", run_id, "--no-progress"]
    assert main(args + [x for o in opts for x in ("--backend-opt", o)]) == 0
    return pd.read_parquet(tmp_path / run_id / "results.parquet").set_index("sample_id").sort_index()


def _reference(model: Path, df: pd.DataFrame) -> dict[str, str]:
    """The model's own generate on each row's prompt (built again from its depth and seed, checked against the
    run's prompt hash; fresh rotary state), decoded and cut at the end id."""
    import hashlib

    from evalctx.backends.hf.conformance import Reference
    from evalctx.tasks import get_task
    from evalctx.models.tokenizer import load_tokenizer

    tok = load_tokenizer(model)
    task = get_task("passkey")(tok, {})
    ref = Reference(str(model), torch.float32, torch.device("cpu"), {2})
    out = {}
    for sid, row in df.iterrows():
        sample = task.make_sample(int(row["context_length"]), float(row["depth"]), int(row["seed"]))
        assert hashlib.sha1(sample.prompt.encode()).hexdigest() == row["prompt_sha1"]
        tokens, _ = ref.answer(sample.prompt_ids, 8)
        out[sid] = tok.decode([t for t in tokens if t != 2])
    return out


@pytest.mark.parametrize("rope", [
    {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0},
    {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 1024,
     "short_factor": [1.0] * 32, "long_factor": [1.0 + 0.25 * i for i in range(32)]},
], ids=["dynamic-ntk", "longrope"])
def test_tiny_with_length_dependent_rope_answers_as_generate_at_every_chunk_size(rope: dict, tmp_path: Path) -> None:
    window = 1024 if rope["rope_type"] == "dynamic" else 4096
    model = _tiny_copy(tmp_path / "m", max_position_embeddings=window, rope_parameters=rope, rope_scaling=rope)
    runs = {c: _run(tmp_path, model, f"c{c}", f"chunk_size={c}") for c in (0, 256, 1024)}
    expected = _reference(model, runs[0])
    for c, df in runs.items():
        assert df["completion"].to_dict() == expected, c
    assert len({round(df["score"].mean(), 3) for df in runs.values()}) == 1


def test_gemma2_runs_by_default_with_the_attention_it_supports(tmp_path: Path) -> None:
    model = families.build(families.by_name("gemma2"), tmp_path / "gemma2")
    (tmp_path / "s.toml").write_text(SUITE.replace("[2048]", "[300]"))
    assert main(["run", "--suite", str(tmp_path / "s.toml"), "--backend", "hf", "--model", str(model), "--out",
                 str(tmp_path), "--run-id", "g", "--no-progress"]) == 0
    manifest = json.loads((tmp_path / "g" / "manifest.json").read_text())
    assert manifest["backend"]["attn_implementation"] == "eager"
    assert manifest["backend"]["forward_check"].startswith("chunked prefill matches the model's forward")


def test_an_end_token_of_the_tokenizer_ends_the_answer_though_generation_config_names_another(
        tmp_path: Path) -> None:
    """generation_config.json says the answer ends on '.' (the tiny model ends every passkey answer with ' N.'),
    the tokenizer says </s>: either ends it, nothing after the end is glued on, and the run stops before the
    budget."""
    from evalctx.models.tokenizer import load_tokenizer

    model = _tiny_copy(tmp_path / "m")
    dot = load_tokenizer(model).encode(".")[-1]
    gen = json.loads((model / "generation_config.json").read_text())
    gen["eos_token_id"] = [dot]
    (model / "generation_config.json").write_text(json.dumps(gen))
    (tmp_path / "s.toml").write_text(SUITE.replace("[2048]", "[512]").replace("max_new_tokens = 8",
                                                                             "max_new_tokens = 20"))
    assert main(["run", "--suite", str(tmp_path / "s.toml"), "--backend", "hf", "--model", str(model), "--out",
                 str(tmp_path), "--run-id", "e", "--no-progress"]) == 0
    df = pd.read_parquet(tmp_path / "e" / "results.parquet")
    assert (df["finish_reason"] == "stop").all() and (df["n_output_tokens"] < 20).all()
    assert not df["completion"].str.contains(r"\.").any()  # cut at the '.' that generation_config names
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert manifest["backend"]["end_ids"] == [2, dot] and manifest["backend"]["decoding"] == "greedy (plain argmax)"


def test_yarn_states_its_scaled_window(tmp_path: Path) -> None:
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 1024}
    model = _tiny_copy(tmp_path / "m", max_position_embeddings=1024, rope_parameters=rope, rope_scaling=rope)
    (tmp_path / "s.toml").write_text(SUITE.replace("[2048]", "[2048, 4096]").replace("samples = 2", "samples = 1"))
    assert main(["run", "--suite", str(tmp_path / "s.toml"), "--backend", "hf", "--model", str(model), "--out",
                 str(tmp_path), "--run-id", "y", "--no-progress"]) == 0
    df = pd.read_parquet(tmp_path / "y" / "results.parquet")
    flagged = df["flags"].map(lambda f: "beyond_trained_window" in list(f))
    assert not flagged[df["context_length"] == 2048].any()  # 2048 + 8 <= 4 x 1024
    assert flagged[df["context_length"] == 4096].all()  # 4096 + 8 > 4096


# --- refusals -------------------------------------------------------------------------------------------------

def test_models_with_recurrent_state_layers_are_refused_in_one_line(tmp_path: Path, capsys) -> None:
    cfg = transformers.Qwen3NextConfig(vocab_size=1024, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=16, intermediate_size=128,
                                       layer_types=["linear_attention", "full_attention"])
    path = tmp_path / "next"
    path.mkdir()
    cfg.save_pretrained(path)
    tiny = resolve_model("tiny").path
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny / f, path / f)
    assert main(["run", "--backend", "hf", "--model", str(path), "--out", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "linear_attention layers" in err[0] and "--backend http" in err[0]


def test_a_generation_config_field_evalctx_cannot_apply_is_refused(tmp_path: Path, capsys) -> None:
    model = _tiny_copy(tmp_path / "m")
    gen = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**gen, "no_repeat_ngram_size": 3}))
    assert main(["run", "--backend", "hf", "--model", str(model), "--out", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no_repeat_ngram_size=3" in err and "generation_config=none" in err


def test_repetition_penalty_of_the_generation_config_applies_as_in_generate(tmp_path: Path) -> None:
    """Qwen2.5-Instruct ships repetition_penalty 1.05; generate(do_sample=False) applies it to every prompt and
    answer token. On the trained tiny model, whose answer copies the passkey's digits from the prompt, a penalty
    changes the answers (50: every token seen falls below the unseen ones), and the engine's still equal generate's."""
    model = _tiny_copy(tmp_path / "m")
    gen = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**gen, "repetition_penalty": 50.0}))
    out = tmp_path / "m.md"
    assert main(["conformance", "--model", str(model), "--lengths", "300", "--chunk-sizes", "0", "48",
                 "--markdown", str(out)]) == 0
    assert all(r[-1] == "ok" for r in _matrix(out))
    from evalctx.backends.base import BackendContext, parse_options
    from evalctx.backends.hf import HFBackend
    from evalctx.backends.hf.conformance import sample_prompts
    from evalctx.records import GenerationRequest
    from evalctx.models.tokenizer import load_tokenizer

    tok = load_tokenizer(model)
    reqs = [GenerationRequest(sample_id=name, prompt_ids=ids, prompt="", max_new_tokens=8)
            for name, ids in sample_prompts(tok, 300)]
    answers = {}
    for mode in ("model", "none"):
        backend = HFBackend(parse_options(HFBackend, {"device": "cpu", "generation_config": mode}),
                            BackendContext(model=str(model), tokenizer=tok))
        answers[mode] = [r.text for r in backend.generate(reqs)]
        assert backend.info()["decoding"].startswith("greedy (repetition_penalty 50)" if mode == "model"
                                                     else "greedy (plain argmax)")
    assert answers["model"] != answers["none"]


def test_a_wrong_engine_is_refused_at_load(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The load-time check: a cache that loses a value makes the chunked prefill differ from the model's forward,
    and the backend refuses to run instead of measuring it."""
    from evalctx.backends.hf import cache
    from evalctx.backends.base import BackendContext, parse_options
    from evalctx.backends.hf import HFBackend
    from evalctx.errors import UsageError
    from evalctx.models.tokenizer import load_tokenizer

    real = cache.PreallocatedLayer.update

    def forgetful(self, key_states, value_states, *args, **kwargs):
        k, v = real(self, key_states, value_states, *args, **kwargs)
        v = v.clone()
        v[:, :, 0] = 0  # the first position's value lost
        return k, v

    monkeypatch.setattr(cache.PreallocatedLayer, "update", forgetful)
    path = families.build(families.by_name("llama"), tmp_path / "llama")
    with pytest.raises(UsageError, match=r"does not reproduce .* own forward \(relative logit error"):
        HFBackend(parse_options(HFBackend, {"device": "cpu"}),
                  BackendContext(model=str(path), tokenizer=load_tokenizer(path)))


@pytest.mark.parametrize("family", ["llama4", "mistral", "gemma2"])
def test_evalctx_sdpa_asked_for_by_name_on_a_model_it_cannot_compute_is_one_line(family: str, tmp_path: Path,
                                                                                 capsys) -> None:
    """It builds no mask: Llama 4's chunked attention was computed as plain causal and answered wrongly (exit 0);
    sliding windows gave a traceback."""
    model = families.build(families.by_name(family), tmp_path / family)
    capsys.readouterr()
    assert main(["run", "--backend", "hf", "--model", str(model), "--out", str(tmp_path), "--no-progress",
                 "--tasks", "passkey", "--lengths", "300", "--samples", "1",
                 "--backend-opt", "attn_implementation=evalctx_sdpa"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a plain causal model" in err[0] and "attn_implementation=auto" in err[0]


@pytest.mark.parametrize("field, value", [
    ("watermarking_config", {"greenlist_ratio": 0.25, "bias": 50.0, "hashing_key": 15485863,
                             "seeding_scheme": "lefthash", "context_width": 1}),
    ("stop_strings", ["7"]),
])
def test_generation_config_fields_that_change_greedy_output_are_refused(field: str, value: object, tmp_path: Path,
                                                                        capsys) -> None:
    model = _tiny_copy(tmp_path / "m")
    gen = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**gen, field: value}))
    assert main(["run", "--backend", "hf", "--model", str(model), "--out", str(tmp_path), "--no-progress",
                 "--tasks", "passkey", "--lengths", "300", "--samples", "1"]) == 2
    assert f"sets {field}=" in capsys.readouterr().err


def test_min_length_applies_only_where_it_could_change_an_answer(tmp_path: Path, capsys) -> None:
    model = _tiny_copy(tmp_path / "m")
    gen = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**gen, "min_length": 400}))
    args = ["run", "--backend", "hf", "--model", str(model), "--out", str(tmp_path), "--no-progress", "--tasks",
            "passkey", "--samples", "1"]
    assert main(args + ["--lengths", "512", "--run-id", "long"]) == 0  # a 512-token prompt: min_length moot
    assert main(args + ["--lengths", "300", "--run-id", "short"]) == 2
    assert "min_length=400, over this 300-token prompt" in capsys.readouterr().err


def test_default_lengths_cross_the_largest_threshold() -> None:
    from evalctx.commands.conformance import default_lengths

    assert default_lengths([16384]) == [12288, 20480]
    low, high = default_lengths([4096, 32768])
    assert low < 4096 and high > 32768
