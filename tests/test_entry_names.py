"""Suite entries by name: the ``task`` column of every row, table, plot, report and gate; task_type/task_options."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from evalctx.analysis.runs import load_run
from evalctx.cli import main
from evalctx.analysis.compare import compare
from evalctx.config import Suite, TaskSpec, load_suite, parse_suite
from evalctx.errors import UsageError
from evalctx.run.sampling import SampleBuilder, enumerate_specs
from evalctx.models.tokenizer import ByteTokenizer
from run_fixtures import write_run

def two_niah(name1: str = "", name2: str = "") -> str:
    """A suite listing niah_single twice, over noise and over essays, with the entry lines given."""
    return 'name = "two"\n' + "".join(
        f'[[tasks]]\ntask = "niah_single"\n{entry}lengths = [500, 900]\ndepths = [0.0, 1.0]\nsamples = 2\n'
        f'[tasks.options]\nhaystack = "{haystack}"\n' for entry, haystack in ((name1, "noise"), (name2, "essay")))


def _parse(tasks: list[dict]) -> Suite:
    return parse_suite({"tasks": tasks}, "x.toml", "x")


def test_colliding_entries_must_be_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The issue's example: niah_single twice (noise and essay) would pool into one row, so it is refused."""
    noise = {"task": "niah_single", "lengths": [500], "options": {"haystack": "noise"}}
    essay = {"task": "niah_single", "lengths": [500], "options": {"haystack": "essay"}}
    with pytest.raises(UsageError, match=r"tasks\[0\] and tasks\[1\] are both named 'niah_single'") as exc:
        _parse([noise, essay])
    assert "\n" not in str(exc.value)
    path = tmp_path / "two.toml"
    path.write_text(two_niah())
    assert main(["run", "--suite", str(path), "--backend", "fake", "--tokenizer", "byte", "--out",
                 str(tmp_path)]) == 2
    assert "give them distinct names" in capsys.readouterr().err
    # named, they are two entries; other differences collide too
    suite = _parse([{**noise, "name": "niah_noise"}, {**essay, "name": "niah_essay"}])
    assert [t.name for t in suite.tasks] == ["niah_noise", "niah_essay"]
    for other in ({"task": "niah_multikey", "lengths": [500]}, {**noise, "prompt_mode": "chat"}):
        with pytest.raises(UsageError, match="both named 'x'"):
            _parse([{**noise, "name": "x"}, {**other, "name": "x"}])


def test_one_variant_may_be_listed_twice() -> None:
    """Same task, options (defaults spelled out or not) and mode under one name: one row, cells run once."""
    suite = _parse([{"task": "passkey", "lengths": [700, 900]},
                    {"task": "passkey", "lengths": [900, 1100], "options": {"template": "trtllm"}, "seed": 0}])
    specs = enumerate_specs(suite, ByteTokenizer())
    assert {s.task for s in specs} == {"passkey"}
    assert sorted(s.context_length for s in specs) == [700, 900, 1100]


@pytest.mark.parametrize("name, match", [("", "name must be"), ("a b", "name must be"), ("-x", "name must be"),
                                         (3, "name must be"), ("passkey", "another task's name")])
def test_bad_names(name: object, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        _parse([{"task": "niah_single", "name": name, "lengths": [500]}])


def test_default_names_keep_the_configuration_and_the_seeds() -> None:
    """Without names the suite's JSON (and so the config hash and run id) and every seed stay as they were."""
    suite = load_suite("default")
    assert all("name" not in t for t in suite.to_json()["tasks"])
    assert [t.name for t in suite.tasks] == [t.task for t in suite.tasks]
    named = _parse([{"task": "niah_single", "name": "niah_single_1", "lengths": [800]}])
    assert named.to_json()["tasks"][0]["name"] == "niah_single_1"
    # a named variant draws its own keys: not the same samples as the unnamed entry
    plain = enumerate_specs(_parse([{"task": "niah_single", "lengths": [800]}]), ByteTokenizer())
    other = enumerate_specs(named, ByteTokenizer())
    assert plain[0].id != other[0].id and plain[0].seed != other[0].seed


def test_suites_built_in_code_are_checked_too() -> None:
    suite = Suite("x", [TaskSpec("niah_single", [500], [0.5]),
                        TaskSpec("niah_single", [500], [0.5], options={"haystack": "essay"})])
    with pytest.raises(UsageError, match="both named"):
        SampleBuilder(suite, ByteTokenizer())


def test_samples_carry_entry_name_type_and_options() -> None:
    suite = _parse([{"task": "niah_single", "name": "niah_single_2", "lengths": [800],
                     "options": {"haystack": "essay"}}])
    builder = SampleBuilder(suite, ByteTokenizer())
    spec = builder.specs()[0]
    sample = builder.build(spec)
    assert (spec.task, spec.task_type) == (sample.task, sample.task_type) == ("niah_single_2", "niah_single")
    assert json.loads(sample.task_options) == {"haystack": "essay", "haystack_dir": None, "key_type": "words",
                                               "value_type": "numbers",
                                               "haystack_sha": "75487e1a14e3a598"}  # the shipped essays' content
    assert sample.id == spec.id


@pytest.fixture(scope="module")
def two_rows(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("names")
    path = root / "two.toml"
    path.write_text(two_niah('name = "niah_single_1"\n', 'name = "niah_single_2"\n'))
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["run", "--suite", str(path), "--backend", "fake", "--tokenizer", "byte", "--out",
                     str(root), "--run-id", "r", "--no-progress"]) == 0
    return root / "r", out.getvalue()


def test_two_named_variants_give_two_rows_everywhere(two_rows: tuple[Path, str]) -> None:
    run_dir, stdout = two_rows
    df = pd.read_parquet(run_dir / "results.parquet")
    assert sorted(df["task"].unique()) == ["niah_single_1", "niah_single_2"]
    assert set(df["task_type"]) == {"niah_single"} and (df["score"] == 1.0).all()
    opts = df.groupby("task")["task_options"].first().map(json.loads)
    assert opts["niah_single_1"]["haystack"] == "noise" and opts["niah_single_2"]["haystack"] == "essay"
    assert (df.groupby("task").size() == 8).all()
    summary = pd.read_csv(run_dir / "summary.csv")
    assert sorted(summary["task"].unique()) == ["niah_single_1", "niah_single_2"] and (summary["n"] == 2).all()
    assert "niah_single_1: accuracy" in stdout and "niah_single_2: accuracy" in stdout
    assert "average over the 2 tasks" in stdout
    gate = compare(load_run(run_dir), load_run(run_dir), min_samples=1)
    assert sorted(gate.table["task"].unique()) == ["niah_single_1", "niah_single_2"]


def test_the_report_and_plots_have_a_row_per_entry(two_rows: tuple[Path, str], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from evalctx.report import write_report

    _, md = write_report([two_rows[0]], out_dir=tmp_path)
    text = md.read_text()
    for name in ("niah_single_1", "niah_single_2"):
        assert f"### {name}" in text and f"{name}: depth x length heatmap" in text
    assert "## Average over tasks" in text
    assert len(list((tmp_path / "plots").glob("heatmap_*.png"))) == 2


def test_the_gate_judges_each_entry_on_its_own(tmp_path: Path) -> None:
    """A drop in one variant fails the gate on that variant's rows only."""
    names = ("niah_single_1", "niah_single_2")
    base = load_run(write_run(tmp_path, "base", tasks=names, samples=30))
    worse = load_run(write_run(tmp_path, "cand", tasks=names, samples=30, miss_from=8192, miss_rate=0.9))
    cand = pd.concat([worse[worse["task"] == "niah_single_2"], base[base["task"] == "niah_single_1"]])
    result = compare(base, cand)
    bad = result.table[result.table["verdict"] == "regression"]
    assert result.regressed and set(bad["task"]) == {"niah_single_2"}
    assert set(bad["context_length"]) == {8192, 16384}


def test_tasks_command_lists_options_with_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    assert 'options: template = "trtllm", key_digits = 5, haystack = "noise", haystack_dir = (unset)' in out
    assert 'haystack = "noise", haystack_dir = (unset), key_type = "words", value_type = "numbers"' in out
    assert "scorer kv_retrieval_match, max_new_tokens 50; options: none" in out
    assert "ruler" in out
