"""The regression gate: Fisher exact (with and without scipy), Holm, verdicts per cell, the compare command."""

from __future__ import annotations

import builtins
import os
from pathlib import Path
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evalctx.analysis import compare as cmp
from evalctx.analysis.runs import load_run
from evalctx.cli import main as cli_main
from run_fixtures import write_run

SMALL = {"tasks": ("passkey",), "lengths": (4096, 8192, 16384), "depths": (0.0, 1.0)}


def _no_scipy(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):  # type: ignore[no-untyped-def]
        if name == "scipy" or name.startswith("scipy."):
            raise ImportError("no scipy here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)


@pytest.mark.parametrize("table, p", [
    # Exact tails: C(30,20)/C(40,20), 1/C(10,5), 1/C(6,3), ...
    ((20, 0, 10, 10), 0.00021796), ((5, 0, 0, 5), 1 / 252), ((3, 0, 0, 3), 0.05), ((10, 10, 10, 10), 0.6238),
    ((0, 20, 20, 0), 1.0),
])
def test_fisher_known_values_with_and_without_scipy(monkeypatch, table, p) -> None:
    assert cmp.fisher_greater(*table) == pytest.approx(p, rel=2e-3)
    _no_scipy(monkeypatch)
    assert cmp.fisher_greater(*table) == pytest.approx(p, rel=2e-3)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 30), st.integers(0, 30), st.integers(0, 30), st.integers(0, 30))
def test_pure_python_fisher_matches_scipy(a: int, b: int, c: int, d: int) -> None:
    from scipy.stats import fisher_exact

    if a + b == 0 or c + d == 0:
        return
    expected = fisher_exact([[a, b], [c, d]], alternative="greater")[1]
    assert cmp._hypergeom_sf(a, a + b + c + d, a + c, a + b) == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_holm_known_values() -> None:
    got = cmp.holm([0.01, 0.04, 0.03, math.nan, 0.5])
    # m = 4: 4 x 0.01, then max(3 x 0.03, 2 x 0.04) for both, then 0.5
    assert got[:3] == pytest.approx([0.04, 0.09, 0.09]) and math.isnan(got[3]) and got[4] == pytest.approx(0.5)


def test_identical_rerun_passes(tmp_path) -> None:
    base = load_run(write_run(tmp_path, "base", **SMALL))
    cand = load_run(write_run(tmp_path, "cand", **SMALL))
    result = cmp.compare(base, cand)
    assert not result.regressed and set(result.table["verdict"]) == {"ok"}
    assert result.headline().startswith("PASS")


def test_missed_needles_at_long_lengths_regress(tmp_path) -> None:
    base = load_run(write_run(tmp_path, "base", **SMALL))
    cand = load_run(write_run(tmp_path, "cand", miss_from=16384, **SMALL))
    result = cmp.compare(base, cand)
    t = result.table
    assert result.regressed
    assert set(t.loc[t["context_length"] == 16384, "verdict"]) == {"regression"}
    assert set(t.loc[t["context_length"] < 16384, "verdict"]) == {"ok"}
    assert (t["p_adjusted"] >= t["p_value"]).all()
    assert "REGRESSION" in result.to_markdown() and "| regression |" in result.to_markdown()
    doc = json.loads(result.to_json())
    assert doc["regressed"] is True and len(doc["cells"]) == len(t)


def test_cells_in_one_run_only(tmp_path) -> None:
    base = load_run(write_run(tmp_path, "base", tasks=("passkey",), lengths=(4096, 8192), depths=(0.5,)))
    cand = load_run(write_run(tmp_path, "cand", tasks=("passkey",), lengths=(8192, 16384), depths=(0.5,)))
    result = cmp.compare(base, cand)
    verdicts = dict(zip(result.table["context_length"], result.table["verdict"]))
    assert verdicts == {4096: "only_in_base", 8192: "ok", 16384: "only_in_candidate"}
    assert result.regressed  # lost coverage
    assert not cmp.compare(base, cand, allow_missing=True).regressed
    # Only new cells never fail the gate.
    assert not cmp.compare(base, load_run(write_run(tmp_path, "more", tasks=("passkey",),
                                                    lengths=(4096, 8192, 16384), depths=(0.5,)))).regressed


def test_small_cells_are_insufficient_unless_they_collapse(tmp_path) -> None:
    opts = {"tasks": ("passkey",), "lengths": (4096, 8192), "depths": (0.5,), "samples": 8}
    base = load_run(write_run(tmp_path, "base", **opts))
    worse = load_run(write_run(tmp_path, "worse", miss_from=8192, miss_rate=0.5, **opts))
    result = cmp.compare(base, worse)
    assert set(result.table["verdict"]) == {"insufficient"} and not result.regressed
    dead = load_run(write_run(tmp_path, "dead", miss_from=8192, miss_rate=1.0, **opts))
    result = cmp.compare(base, dead)
    assert dict(zip(result.table["context_length"], result.table["verdict"])) == {4096: "insufficient",
                                                                                    8192: "regression"}
    assert result.regressed and "collapse" in result.table["note"].iloc[1]
    crashed = load_run(write_run(tmp_path, "crashed", error_from=8192, **opts))
    assert cmp.compare(base, crashed).table["verdict"].tolist() == ["insufficient", "regression"]


def test_errors_and_latency(tmp_path) -> None:
    base = load_run(write_run(tmp_path, "base", **SMALL))
    oom = cmp.compare(base, load_run(write_run(tmp_path, "oom", error_from=16384, **SMALL)))
    t = oom.table
    assert oom.regressed and set(t.loc[t["context_length"] == 16384, "verdict"]) == {"error_regression"}
    assert (t.loc[t["context_length"] == 16384, "cand_error_rate"] == 1.0).all()
    slow = cmp.compare(base, load_run(write_run(tmp_path, "slow", latency_scale=1.3, **SMALL)))
    assert slow.regressed and set(slow.table["verdict"]) == {"latency_regression"}
    assert slow.table["latency_ratio"].between(1.25, 1.35).all()
    assert not cmp.compare(base, load_run(write_run(tmp_path, "jitter", latency_scale=1.05, **SMALL))).regressed
    assert not cmp.compare(base, load_run(write_run(tmp_path, "slow2", latency_scale=1.3, **SMALL)),
                           latency_tolerance=0.5).regressed


def test_latency_jitter_below_the_floor_is_not_a_regression(tmp_path) -> None:
    # Sub-millisecond requests (a fake backend): +30% is well under the 2 ms floor.
    fast = load_run(write_run(tmp_path, "fast", latency_scale=0.001, **SMALL))
    jitter = load_run(write_run(tmp_path, "jitter", latency_scale=0.0013, **SMALL))
    assert not cmp.compare(fast, jitter).regressed
    assert cmp.compare(fast, jitter, latency_min_delta_s=0.0).regressed


def test_fractional_scores_are_rounded(tmp_path) -> None:
    base = load_run(write_run(tmp_path, "base", tasks=("passkey",), lengths=(4096,), depths=(0.5,)))
    cand = base.copy()
    cand["score"] = 0.5  # partial credit everywhere: 10 successes of 20
    result = cmp.compare(base, cand)
    assert result.table["cand_accuracy"].iloc[0] == 0.5 and result.regressed
    assert result.table["p_value"].iloc[0] == pytest.approx(cmp.fisher_greater(20, 0, 10, 10))


def test_holm_keeps_chance_dips_from_failing(tmp_path) -> None:
    opts = {"tasks": ("passkey", "niah_single"), "lengths": (4096, 8192, 16384, 32768), "depths": (0.0, 0.5, 1.0)}
    base = load_run(write_run(tmp_path, "base", base_accuracy=0.7, seed=0, **opts))
    cand = load_run(write_run(tmp_path, "cand", base_accuracy=0.7, seed=1, **opts))  # same model, new prompts
    holm_result = cmp.compare(base, cand)
    raw_result = cmp.compare(base, cand, correction="none")
    assert (holm_result.table["p_adjusted"] >= raw_result.table["p_adjusted"]).all()
    assert not holm_result.regressed


def test_compare_command_exit_codes(tmp_path, capsys) -> None:
    base = write_run(tmp_path, "base", **SMALL)
    same = write_run(tmp_path, "same", **SMALL)
    bad = write_run(tmp_path, "bad", miss_from=16384, **SMALL)
    assert cli_main(["compare", str(base), str(same)]) == 0
    assert "PASS" in capsys.readouterr().out
    assert cli_main(["compare", str(base), str(bad), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["regressed"] is True
    assert cli_main(["compare", str(base), str(bad), "--min-samples", "50"]) == 0  # all insufficient
    capsys.readouterr()
    assert cli_main(["compare", str(base), str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "no such directory" in err and "Traceback" not in err and err.count("\n") == 1
    assert cli_main(["compare", str(base), str(same), "--alpha", "0"]) == 2


FIVE_DEPTHS = {"tasks": ("passkey",), "lengths": (4096, 8192, 16384), "depths": (0.0, 0.25, 0.5, 0.75, 1.0)}


def _miss_per_cell(run_dir, length: int, misses: int = 3):  # type: ignore[no-untyped-def]
    """Rewrite the run so that the first ``misses`` samples of every depth at ``length`` miss the needle."""
    import pandas as pd

    path = run_dir / "results.parquet"
    df = pd.read_parquet(path)
    first = df.groupby(["task", "context_length", "depth"]).cumcount() < misses
    hit = first & (df["context_length"] == length)
    df.loc[hit, "score"], df.loc[hit, "extracted"], df.loc[hit, "completion"] = 0.0, None, "I don't know"
    df.to_parquet(path, index=False)
    return run_dir


def test_pooled_length_catches_a_drop_spread_over_the_depths(tmp_path, capsys) -> None:
    base_dir = write_run(tmp_path, "base", **FIVE_DEPTHS)
    cand_dir = _miss_per_cell(write_run(tmp_path, "cand", **FIVE_DEPTHS), 8192)  # 20/20 -> 17/20 at every depth
    base, cand = load_run(base_dir), load_run(cand_dir)
    result = cmp.compare(base, cand)
    t = result.table
    cells, pooled = t[t["level"] == "cell"], t[t["level"] == "length"]
    assert len(cells) == 15 and len(pooled) == 3 and pooled["depth"].isna().all()
    assert pooled["pooled_depths"].tolist() == [5, 5, 5]
    # Cell by cell: p = C(37,20)/C(40,20) = 0.115, not significant even before Holm.
    drop = cells[cells["context_length"] == 8192]
    assert (drop["cand_accuracy"] == 0.85).all() and set(drop["verdict"]) == {"ok"}
    assert drop["p_value"].tolist() == pytest.approx([cmp.fisher_greater(20, 0, 17, 3)] * 5)
    assert (drop["p_value"] > 0.1).all() and (drop["p_adjusted"] >= drop["p_value"]).all()
    # Pooled over 5 depths, 100 a side: 100/100 -> 85/100 is p ~ 2e-5, significant after Holm over 18 tests.
    row = pooled[pooled["context_length"] == 8192].iloc[0]
    assert (row["base_n"], row["cand_n"], row["cand_accuracy"]) == (100, 100, 0.85)
    assert row["p_value"] == pytest.approx(cmp.fisher_greater(100, 0, 85, 15)) and row["p_value"] < 1e-4
    assert row["p_adjusted"] < 0.05 and row["verdict"] == "regression"
    assert row["note"].startswith("pooled over 5 depths")
    assert set(pooled.loc[pooled["context_length"] != 8192, "verdict"]) == {"ok"}
    assert result.regressed and "pooled lengths" in result.headline()
    md = result.to_markdown(only_notable=True)
    assert "| all |" in md and "| regression |" in md and "pooled lengths" in md
    doc = json.loads(result.to_json())
    assert doc["pooled"] is True and [c["level"] for c in doc["cells"]].count("length") == 3
    # Each length's pooled row follows its cells.
    assert t["level"].tolist() == (["cell"] * 5 + ["length"]) * 3
    # Without the pooled level the drop passes, as it did before.
    cells_only = cmp.compare(base, cand, pooled=False)
    assert not cells_only.regressed and set(cells_only.table["level"]) == {"cell"} and len(cells_only.table) == 15
    # Through the command: exit 1, and 0 with --no-pooled.
    assert cli_main(["compare", str(base_dir), str(cand_dir)]) == 1
    assert "| regression |" in capsys.readouterr().out
    assert cli_main(["compare", str(base_dir), str(cand_dir), "--no-pooled"]) == 0
    assert "PASS" in capsys.readouterr().out


def test_pooled_rows_pass_an_identical_rerun(tmp_path, capsys) -> None:
    base_dir, same_dir = write_run(tmp_path, "base", **FIVE_DEPTHS), write_run(tmp_path, "same", **FIVE_DEPTHS)
    result = cmp.compare(load_run(base_dir), load_run(same_dir))
    pooled = result.table[result.table["level"] == "length"]
    assert len(pooled) == 3 and (pooled["p_value"] == 1.0).all()
    assert not result.regressed and set(result.table["verdict"]) == {"ok"}
    assert cli_main(["compare", str(base_dir), str(same_dir)]) == 0
    assert "PASS" in capsys.readouterr().out
    # A chance dip at 70% accuracy (new prompts) stays below the pooled level's bar too.
    opts = {**FIVE_DEPTHS, "tasks": ("passkey", "niah_single")}
    noisy = cmp.compare(load_run(write_run(tmp_path, "b70", base_accuracy=0.7, seed=0, **opts)),
                        load_run(write_run(tmp_path, "c70", base_accuracy=0.7, seed=1, **opts)))
    assert not noisy.regressed and (noisy.table["level"] == "length").sum() == 6


def test_pooled_rows_only_over_depths_both_runs_have(tmp_path) -> None:
    opts = {"tasks": ("passkey",), "lengths": (4096, 8192)}
    base = load_run(write_run(tmp_path, "base", depths=(0.0, 0.5, 1.0), **opts))
    base.loc[base["depth"] == 0.0, "score"] = 0.0  # a base-only depth that would drag the pooled base down
    cand = load_run(write_run(tmp_path, "cand", depths=(0.25, 0.5, 1.0), **opts))
    # At 8K the candidate keeps only depth 0.5: one common depth, so no pooled row (it would repeat the cell).
    cand = cand[(cand["context_length"] == 4096) | (cand["depth"] == 0.5)]
    result = cmp.compare(base, cand, allow_missing=True)
    t = result.table
    pooled = t[t["level"] == "length"]
    assert pooled["context_length"].tolist() == [4096]
    row = pooled.iloc[0]
    assert row["pooled_depths"] == 2 and (row["base_n"], row["cand_n"]) == (40, 40)
    assert (row["base_accuracy"], row["cand_accuracy"]) == (1.0, 1.0) and row["verdict"] == "ok"
    assert set(t.loc[t["level"] == "cell", "verdict"]) == {"ok", "only_in_base", "only_in_candidate"}
    assert not result.regressed
    assert cmp.compare(base, cand).regressed  # the lost depth is still lost coverage


def test_compare_lists_different_tokenizers_with_the_verdict(tmp_path, capsys) -> None:
    """Another tokenizer is part of the system under test (another model): listed with the verdict, not refused."""
    from pathlib import Path

    suite = str(Path(__file__).parent / "data" / "suites" / "fake_small.toml")
    for run_id, tok in (("byte", "byte"), ("byte2", "byte"), ("tiny", "tiny")):
        assert cli_main(["run", "--suite", suite, "--backend", "fake", "--tokenizer", tok, "--out", str(tmp_path),
                         "--run-id", run_id, "--no-progress", "--label", "same"]) == 0
    capsys.readouterr()
    assert cli_main(["compare", str(tmp_path / "byte"), str(tmp_path / "tiny")]) == 0  # the oracle: no regression
    out = capsys.readouterr().out
    assert "- the system under test differs: tokenizer: fingerprint byte / fingerprint " in out
    assert cli_main(["compare", str(tmp_path / "byte"), str(tmp_path / "byte2")]) == 0
    assert "Differences between the runs" not in capsys.readouterr().out


def _named_entry_suite(tmp_path, file: str, task: str, options: str) -> str:
    path = tmp_path / file
    path.write_text(f'name = "gate"\n[[tasks]]\ntask = "{task}"\nname = "niah_single_1"\nlengths = [1200]\n'
                    f'depths = [0.0, 1.0]\nsamples = 2\n[tasks.options]\n{options}\n')
    return str(path)


def test_compare_refuses_an_entry_name_that_is_another_task_in_each_run(tmp_path, capsys) -> None:
    """The gate keys on the entry name: niah_single_1 as a noise niah_single in the baseline and as a niah_multikey
    (or an essay niah_single) in the candidate used to PASS silently, comparing two different tasks."""
    suites = {"base": ("niah_single", 'haystack = "noise"'), "same": ("niah_single", 'haystack = "noise"'),
              "multikey": ("niah_multikey", 'haystack = "needle"'), "essay": ("niah_single", 'haystack = "essay"')}
    for run_id, (task, options) in suites.items():
        suite = _named_entry_suite(tmp_path, f"{run_id}.toml", task, options)
        assert cli_main(["run", "--suite", suite, "--backend", "fake", "--tokenizer", "byte", "--out",
                         str(tmp_path / "runs"), "--run-id", run_id, "--no-progress"]) == 0
    capsys.readouterr()
    runs = tmp_path / "runs"
    assert cli_main(["compare", str(runs / "base"), str(runs / "same")]) == 0
    assert capsys.readouterr().err == ""
    assert cli_main(["compare", str(runs / "base"), str(runs / "multikey")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "task of niah_single_1: niah_single / niah_multikey" in err[0]
    assert "--allow-different task" in err[0]
    assert cli_main(["compare", str(runs / "base"), str(runs / "essay")]) == 2
    err = capsys.readouterr().err
    assert "task of niah_single_1: haystack='noise', haystack_sha=" in err and "/ haystack='essay'" in err
    assert cli_main(["compare", str(runs / "base"), str(runs / "essay"), "--allow-different", "task"]) == 0
    assert "- compared across a different task of niah_single_1: haystack='noise'" in capsys.readouterr().out
    # an option the baseline does not record (added since, default = the old behaviour) is not a difference
    base, cand = load_run(runs / "base"), load_run(runs / "same")
    base["task_options"] = base["task_options"].str.replace('"key_type": "words", ', "")
    from evalctx.analysis.comparability import differences

    assert [d for d in differences({}, base, {}, cand) if d.setting == "task"] == []
    assert [d for d in differences({}, base.drop(columns=["task_type", "task_options"]), {},
                                   load_run(runs / "essay")) if d.setting == "task"] == []


def test_the_gate_never_passes_a_run_still_running_unfinished_or_nothing_compared(tmp_path, capsys) -> None:
    """Issue 23, kind 5: `compare BASE LIVE --allow-missing` said PASS for a candidate still running or killed, and
    two runs with no cell in common passed with nothing compared."""
    import fcntl
    import json as _json

    def run(run_id: str, lengths: str) -> Path:
        assert cli_main(["run", "--backend", "fake", "--tasks", "passkey", "--samples", "2", "--lengths", lengths,
                         "--out", str(tmp_path), "--run-id", run_id, "--no-progress"]) == 0
        return tmp_path / run_id

    base, cand, other = run("base", "512"), run("cand", "512"), run("other", "1024")
    capsys.readouterr()
    assert cli_main(["compare", str(base), str(cand)]) == 0
    # no cell in common: never a pass, whatever --allow-missing says
    assert cli_main(["compare", str(base), str(other), "--allow-missing"]) == 1
    assert "no cell in common: nothing was compared" in capsys.readouterr().out
    # a candidate killed mid-run (status left running, no lock): its verdict fails
    manifest = _json.loads((cand / "manifest.json").read_text())
    (cand / "manifest.json").write_text(_json.dumps({**manifest, "status": "running"}))
    assert cli_main(["compare", str(base), str(cand), "--allow-missing"]) == 1
    assert "the candidate run is 'running', not finished" in capsys.readouterr().out
    # a candidate a live command holds: refused before any verdict, and the gate records nothing
    fd = os.open(cand / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert cli_main(["compare", str(base), str(cand)]) == 2
        assert "is still running" in capsys.readouterr().err
        assert cli_main(["nightly-gate", str(cand), "--history", str(tmp_path / "h"), "--no-report"]) == 2
        assert not (tmp_path / "h" / "summary.csv").exists()
    finally:
        os.close(fd)


def test_newcombe_interval_known_values() -> None:
    from evalctx.stats import newcombe_interval

    # Newcombe (1998), example 1: 56/70 - 48/80, method 10
    lo, hi = newcombe_interval(48, 80, 56, 70)
    assert lo == pytest.approx(0.0524, abs=1e-4) and hi == pytest.approx(0.3339, abs=1e-4)
    assert newcombe_interval(0, 0, 1, 2) == pytest.approx((math.nan, math.nan), nan_ok=True)
    lo, hi = newcombe_interval(20, 20, 20, 20)  # no difference at the ceiling: symmetric, inside [-1, 1]
    assert -1 < lo < 0 < hi < 1 and lo == pytest.approx(-hi)


def test_each_row_states_the_accuracy_change_with_its_interval(tmp_path) -> None:
    base = load_run(write_run(tmp_path, "base", **SMALL))
    cand = load_run(write_run(tmp_path, "cand", miss_from=16384, **SMALL))
    t = cmp.compare(base, cand).table
    lost = t[t["context_length"] == 16384]
    assert (lost["delta"] < 0).all() and (lost["delta_high"] < 0).all()  # a loss the interval excludes 0 from
    kept = t[t["context_length"] < 16384]
    assert (kept["delta"] == 0).all() and (kept["delta_low"] < 0).all() and (kept["delta_high"] > 0).all()
    md = cmp.compare(base, cand).to_markdown()
    assert "Δ pp (95% CI)" in md and "| -45.0 [-60, -28] |" in md
