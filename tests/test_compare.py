"""The regression gate: Fisher exact (with and without scipy), Holm, verdicts per cell, the compare command."""

from __future__ import annotations

import builtins
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evalctx import compare as cmp
from evalctx.analysis import load_run
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
