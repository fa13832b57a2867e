"""Issue 10's examples, one test per kind of silent error, each with the example's right value.

The widening tests live next to the code they check (test_tasks, test_placement, test_scoring, test_preflight,
test_tokenizer, test_identity, test_plan).
"""

from __future__ import annotations

import json

from pathlib import Path

import pandas as pd
import pytest

from evalctx.cli import main
from evalctx.tasks.scoring import score

DATA = Path(__file__).parent / "data"


def _write_suite(path: Path, body: str) -> str:
    path.write_text(body)
    return str(path)


# -- 4. scorers and the target column -----------------------------------------------------------------------------
def test_kind4_targets_are_lists_and_rescoring_from_the_parquet_agrees(tmp_path: Path) -> None:
    suite = _write_suite(tmp_path / "s.toml", 'name = "s"\n[[tasks]]\ntask = "niah_single"\nlengths = [500]\n'
                                              "depths = [0.5]\nsamples = 5\n")
    code = main(["run", "--suite", suite, "--backend", "fake", "--tokenizer", "byte", "--out", str(tmp_path),
                 "--run-id", "r", "--no-progress", "--backend-opt", "mode=constant",
                 "--backend-opt", "text= 0123456789."])
    assert code == 0
    df = pd.read_parquet(tmp_path / "r" / "results.parquet")
    assert df["score"].tolist() == [0.0] * 5  # 0/5: every digit is in the output, no 7-digit value is
    for row in df.itertuples():
        assert len(row.target) == 1 and len(row.target[0]) == 7  # a list of one 7-digit value, not a string
        assert score(row.scorer, row.completion, row.target).value == row.score
    with pytest.raises(TypeError, match="bare string"):
        score("string_match_all", " 0123456789.", "7503775")
    with pytest.raises(TypeError, match="bare string"):
        score("first_int_match", " 1.", "12345")


def test_kind4_results_written_before_the_list_column_load_as_lists(tmp_path: Path) -> None:
    from evalctx.analysis.runs import load_run

    from run_fixtures import write_run

    run_dir = write_run(tmp_path, "old", tasks=("niah_multivalue",), lengths=(4096,), depths=(0.5,), samples=2)
    df = pd.read_parquet(run_dir / "results.parquet")
    df["target"] = ["1111111|2222222", "3333333|4444444"]  # how older versions stored four-value answers
    df.to_parquet(run_dir / "results.parquet", index=False)
    loaded = load_run(run_dir)
    assert loaded["target"].tolist() == [["1111111", "2222222"], ["3333333", "4444444"]]
    assert score("string_match_all", " 1111111.", loaded["target"].iloc[0]).value == 0.5


# -- 1. special tokens --------------------------------------------------------------------------------------------
TINY = Path(__file__).resolve().parent.parent / "evalctx" / "data" / "models" / "tiny"


def tiny_copy_appending_eos(dest: Path) -> Path:
    """The tiny model with a tokenizer that appends ``</s>`` (post-processor ``<s> $A </s>``, add_eos_token)."""
    import json
    import shutil

    shutil.copytree(TINY, dest)
    tok = json.loads((dest / "tokenizer.json").read_text())
    special = {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}, "</s>": {"id": "</s>", "ids": [2], "tokens": ["</s>"]}}
    seq = [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
           {"SpecialToken": {"id": "</s>", "type_id": 0}}]
    tok["post_processor"] = {"type": "TemplateProcessing", "single": seq, "pair": seq, "special_tokens": special}
    (dest / "tokenizer.json").write_text(json.dumps(tok))
    cfg = json.loads((dest / "tokenizer_config.json").read_text())
    cfg["add_eos_token"] = True
    (dest / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dest


def test_kind1_a_tokenizer_that_appends_eos_builds_the_same_prompts(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from evalctx.tasks import get_task
    from evalctx.models.tokenizer import HFTokenizer

    eos_tok = HFTokenizer(tiny_copy_appending_eos(tmp_path / "tiny-eos"))
    assert eos_tok._rust.encode("The pass key is").ids[-1] == 2  # its files really append </s>
    plain = get_task("passkey")(HFTokenizer(TINY), {}).make_sample(256, 0.5, 1)
    s = get_task("passkey")(eos_tok, {}).make_sample(256, 0.5, 1)
    assert s.prompt.endswith("The pass key is") and s.prompt_ids[-1] != 2
    assert s.prompt_ids == plain.prompt_ids and s.prompt_ids[0] == 1


def test_kind1_the_tiny_model_with_an_eos_appending_tokenizer_still_scores_100(tmp_path: Path) -> None:
    """The issue's example: 0% (every prompt ended ``The pass key is</s>``); the right value is 100%."""
    pytest.importorskip("torch")
    model = tiny_copy_appending_eos(tmp_path / "tiny-eos")
    suite = _write_suite(tmp_path / "pk.toml", 'name = "pk"\n[[tasks]]\ntask = "passkey"\nlengths = [256]\n'
                                               "depths = [0.0, 0.5, 1.0]\nsamples = 3\n")
    code = main(["run", "--suite", suite, "--backend", "hf", "--model", str(model), "--out", str(tmp_path),
                 "--run-id", "r", "--no-progress", "--backend-opt", "threads=1", "--backend-opt", "device=cpu"])
    assert code == 0
    df = pd.read_parquet(tmp_path / "r" / "results.parquet")
    assert len(df) == 9 and df["score"].tolist() == [1.0] * 9


# -- 2. lengths near the minimum ------------------------------------------------------------------------------------
def _niah_suite(tmp_path: Path, lengths: str, samples: int = 30) -> str:
    return _write_suite(tmp_path / "niah.toml", f'name = "n"\n[[tasks]]\ntask = "niah_single"\nlengths = {lengths}\n'
                                                f"depths = [0.0, 0.5, 1.0]\nsamples = {samples}\n")


def test_kind2_a_length_below_the_true_minimum_is_refused_up_front(tmp_path: Path, capsys) -> None:
    pytest.importorskip("transformers")
    from evalctx.tasks import get_task
    from evalctx.models.tokenizer import load_tokenizer

    need = get_task("niah_single")(load_tokenizer("tiny"), {}).min_length()
    assert need > 92  # one draw needed 92; keys and values differ, the run needed 95 at sample 56
    code = main(["run", "--suite", _niah_suite(tmp_path, "[92, 4096]"), "--backend", "fake", "--tokenizer", "tiny",
                 "--out", str(tmp_path), "--run-id", "r", "--no-progress"])
    assert code == 2 and not (tmp_path / "r").exists()
    assert f"use lengths >= {need}" in capsys.readouterr().err
    # generate refuses the same suite (it wrote the samples that happened to fit, skipping the rest, exit 0)
    code = main(["generate", "--suite", _niah_suite(tmp_path, "[92, 4096]"), "--tokenizer", "tiny",
                 "--out", str(tmp_path / "g.jsonl"), "--no-progress"])
    assert code == 2 and not (tmp_path / "g.jsonl").exists()
    assert f"use lengths >= {need}" in capsys.readouterr().err


@pytest.mark.parametrize("near", [32, 0])  # 0: nothing built up front, the loop's own check must hold
def test_kind2_samples_that_cannot_be_built_become_unsupported_rows(tmp_path: Path, capsys, monkeypatch,
                                                                    near: int) -> None:
    from evalctx.run.sampling import SampleBuilder
    from evalctx.tasks import get_task
    from evalctx.models.tokenizer import ByteTokenizer

    monkeypatch.setattr(SampleBuilder, "NEAR_MINIMUM", near)
    lo = get_task("niah_single")(ByteTokenizer(), {}).min_length()
    args = ["run", "--suite", _niah_suite(tmp_path, f"[{lo}, {lo + 1}, {lo + 2}]", 40), "--backend", "fake",
            "--tokenizer", "byte", "--out", str(tmp_path), "--run-id", "r", "--no-progress"]
    assert main(args) == 0
    df = pd.read_parquet(tmp_path / "r" / "results.parquet")
    assert len(df) == 360 and set(df["status"]) == {"ok", "unsupported"}
    bad = df[df["status"] == "unsupported"]
    assert 0 < len(bad) < 10 and bad["error"].str.contains("too short|no haystack cut").all()
    assert (df.loc[df["status"] == "ok", "score"] == 1.0).all()
    assert "evalctx: unsupported:" in capsys.readouterr().err
    assert main(args) == 0 and "0 new of 360" in capsys.readouterr().out  # a resume does not retry them


# -- 3. answer budget --------------------------------------------------------------------------------------------------
def _passkey8(tmp_path: Path, budget: str = "") -> str:
    return _write_suite(tmp_path / "pk8.toml", 'name = "pk8"\n[[tasks]]\ntask = "passkey"\nlengths = [256]\n'
                                               f"depths = [0.0, 0.5, 1.0]\nsamples = 2\n{budget}"
                                               "[tasks.options]\nkey_digits = 8\n")


def test_kind3_the_default_budget_holds_an_8_digit_key(tmp_path: Path, capsys) -> None:
    """The issue's example: max_new_tokens stayed 6, answers were cut to 5 digits, 0%; the right value is 100%."""
    pytest.importorskip("torch")
    code = main(["run", "--suite", _passkey8(tmp_path), "--backend", "hf", "--model", "tiny", "--out",
                 str(tmp_path), "--run-id", "r", "--no-progress", "--backend-opt", "threads=1",
                 "--backend-opt", "device=cpu"])
    assert code == 0 and "warning" not in capsys.readouterr().err
    df = pd.read_parquet(tmp_path / "r" / "results.parquet")
    assert (df["max_new_tokens"] == 9).all() and (df["meta_answer_tokens"] == 9).all()  # " " + 8 digits
    assert df["score"].tolist() == [1.0] * 6 and all(len(f) == 0 for f in df["flags"])


def test_kind3_a_hand_set_budget_too_small_warns_and_flags(tmp_path: Path, capsys) -> None:
    pytest.importorskip("torch")
    code = main(["run", "--suite", _passkey8(tmp_path, "max_new_tokens = 6\n"), "--backend", "hf", "--model",
                 "tiny", "--out", str(tmp_path), "--run-id", "r", "--no-progress", "--backend-opt", "threads=1",
                 "--backend-opt", "device=cpu"])
    assert code == 0
    err = capsys.readouterr().err
    assert "max_new_tokens 6 cannot hold its answers (up to 9 tokens" in err and "raise max_new_tokens to >= 9" in err
    df = pd.read_parquet(tmp_path / "r" / "results.parquet")
    assert (df["score"] == 0.0).all() and all(list(f) == ["short_budget"] for f in df["flags"])
    assert pd.read_csv(tmp_path / "r" / "summary.csv")["n_flagged"].sum() == 6


@pytest.mark.parametrize("task,budget", [("kv_retrieval", 10), ("niah_multivalue", 8), ("passkey", 3)])
def test_kind3_every_task_flags_rows_whose_budget_cut_the_answer(tmp_path: Path, capsys, task, budget) -> None:
    """The kind, past passkey: every task keeps each row's answer length and flags the rows a hand-set budget cut
    (kv_retrieval kept none, so its cut uuids scored 0 unflagged). The fake backend cuts at the budget as a real
    model does (cut_at_budget)."""
    suite = _write_suite(tmp_path / "s.toml", f'name = "s"\n[[tasks]]\ntask = "{task}"\nlengths = [900]\n'
                                              f"depths = [0.0, 1.0]\nsamples = 2\nmax_new_tokens = {budget}\n")
    code = main(["run", "--suite", suite, "--backend", "fake", "--tokenizer", "byte", "--out", str(tmp_path),
                 "--run-id", "r", "--no-progress", "--backend-opt", "cut_at_budget=true"])
    assert code == 0
    assert f"max_new_tokens {budget} cannot hold its answers" in capsys.readouterr().err
    df = pd.read_parquet(tmp_path / "r" / "results.parquet")
    assert (df["meta_answer_tokens"] > budget).all() and (df["n_output_tokens"] == budget).all()
    assert (df["finish_reason"] == "length").all() and (df["score"] < 1.0).all()  # multivalue: 1 of 4 values
    assert all(list(f) == ["short_budget"] for f in df["flags"])


# -- 6. run identity --------------------------------------------------------------------------------------------------
def test_kind6_a_model_changed_in_place_is_another_run(tmp_path: Path, capsys) -> None:
    """The issue's example: after adding linear RoPE scaling to the copy's config.json the rerun said
    "complete, 0 new" with the stale 100%. The right value: the changed model runs, and scores what the same
    change shipped as ``tiny-rope-linear`` scores."""
    pytest.importorskip("torch")
    import json
    import shutil

    model = tmp_path / "tiny-copy"
    shutil.copytree(TINY, model)
    suite = _write_suite(tmp_path / "pk.toml", 'name = "pk"\n[[tasks]]\ntask = "passkey"\nlengths = [1024]\n'
                                               "depths = [0.0, 0.5]\nsamples = 3\n")

    def run(model_arg: str, out: Path, *extra: str) -> int:
        return main(["run", "--suite", suite, "--backend", "hf", "--model", model_arg, "--out", str(out),
                     "--no-progress", "--backend-opt", "threads=1", "--backend-opt", "device=cpu", *extra])

    assert run(str(model), tmp_path / "a") == 0
    first = next((tmp_path / "a").iterdir())
    assert "6 new of 6" in capsys.readouterr().out
    cfg = json.loads((model / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "linear", "factor": 4.0}
    (model / "config.json").write_text(json.dumps(cfg))
    assert run(str(model), tmp_path / "a") == 0
    assert "6 new of 6" in capsys.readouterr().out  # a new run, not "0 new" with the old numbers
    second = next(d for d in (tmp_path / "a").iterdir() if d != first)
    manifest = json.loads((second / "manifest.json").read_text())
    assert manifest["model_fingerprint"]["files"]["config.json"] != json.loads(
        (first / "manifest.json").read_text())["model_fingerprint"]["files"]["config.json"]
    assert run("tiny-rope-linear", tmp_path / "b") == 0
    reference = pd.read_parquet(next((tmp_path / "b").iterdir()) / "results.parquet")
    changed = pd.read_parquet(second / "results.parquet")
    assert changed["completion"].tolist() == reference["completion"].tolist()
    # the same --run-id is refused, naming what changed
    assert run(str(model), tmp_path / "a", "--run-id", first.name) == 2
    assert "the model's files changed: config.json" in capsys.readouterr().err


# -- 7. a tokenizer that does not fit the model ------------------------------------------------------------------------
def test_kind7_the_byte_tokenizer_against_the_tiny_model_is_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    """The issue's example gave a traceback (ids the byte tokenizer cannot decode) or a silent 0%."""
    pytest.importorskip("torch")
    suite = _write_suite(tmp_path / "pk.toml", 'name = "pk"\n[[tasks]]\ntask = "passkey"\nlengths = [600]\n')
    code = main(["run", "--suite", suite, "--backend", "hf", "--model", "tiny", "--tokenizer", "byte",
                 "--out", str(tmp_path), "--run-id", "r", "--no-progress", "--backend-opt", "device=cpu"])
    err = capsys.readouterr().err
    assert code == 2 and not (tmp_path / "r" / "journal").exists()  # nothing ran; the manifest says why
    assert json.loads((tmp_path / "r" / "manifest.json").read_text())["status"] == "failed"
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "tokenizer byte does not tokenize like the one tiny ships" in err and "pass --tokenizer tiny" in err


# -- 5. model limits: tests/test_model_limits.py (the window of 256 and the 900-token prompt) and
#       tests/test_hf_checks.py (sliding window, absolute positions and RoPE beyond the window through the hf backend)


# -- 8. names users type ------------------------------------------------------------------------------------------------
def test_kind8_plan_takes_float16_and_warns_beyond_max_position_embeddings(capsys) -> None:
    assert main(["plan", "--config", "tiny", "--context", "4096", "--weight-dtype", "float16"]) == 0
    out = capsys.readouterr()
    assert "fp16" in out.out and out.err == ""
    assert main(["plan", "--config", "tiny", "--context", "2000000", "--weight-dtype", "bfloat16",
                 "--kv-dtype", "float16"]) == 0
    assert "exceeds the model's max_position_embeddings 1,048,576" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["trtllm", "hf"])
def test_kind8_plan_warns_for_both_backends_and_for_a_sliding_window(tmp_path: Path, capsys, backend) -> None:
    """`plan --backend hf` said nothing about a context past max_position_embeddings; neither plan said anything
    about a sliding window in every layer, which makes evalctx run mark longer prompts unsupported."""
    tiny = json.loads((Path(__file__).parent.parent / "evalctx" / "data" / "models" / "tiny" / "config.json")
                      .read_text())
    (tmp_path / "config.json").write_text(json.dumps({**tiny, "max_position_embeddings": 512}))
    assert main(["plan", "--config", str(tmp_path), "--context", "4096", "--backend", backend]) == 0
    assert "exceeds the model's max_position_embeddings 512" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({**tiny, "model_type": "mistral", "sliding_window": 256}))
    assert main(["plan", "--config", str(tmp_path), "--context", "4096", "--backend", backend]) == 0
    assert "exceeds the sliding window of 256 tokens in every layer" in capsys.readouterr().err
    assert main(["plan", "--config", str(tmp_path), "--context", "256", "--backend", backend]) == 0
    assert capsys.readouterr().err == ""
