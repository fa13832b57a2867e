"""Loading run directories, summaries with Wilson intervals, effective length, length labels."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from evalctx.analysis import runs as analysis
from evalctx.errors import UsageError
from evalctx.stats import wilson_interval
from run_fixtures import write_run


@pytest.mark.parametrize("n, label", [
    (1000, "1000"), (1024, "1K"), (4096, "4K"), (131072, "128K"), (1048576, "1M"),
    # multiples of 1000 are decimal lengths: never "125K" for 128000
    (128000, "128000"), (256000, "256000"), (1024000, "1024000"),
    (2 * 1048576, "2M"), (1536, "1536"), (3072, "3K"), (0, "0"),
])
def test_length_label(n: int, label: str) -> None:
    assert analysis.length_label(n) == label


def test_load_run_from_parquet(tmp_path) -> None:
    run = write_run(tmp_path, "r1", label="fp16", lengths=(4096, 8192), depths=(0.0, 1.0), samples=3)
    df = analysis.load_run(run)
    assert len(df) == 2 * 2 * 2 * 3
    assert set(df["label"]) == {"fp16"} and set(df["run_id"]) == {"r1"}
    assert set(df["created_at"]) == {"2026-01-01T02:00:00Z"} and set(df["run_status"]) == {"complete"}
    assert df["context_length"].dtype == "int64" and df["depth"].dtype == float
    assert {"engine_dtype", "engine_max_num_tokens", "backend", "model"} <= set(df.columns)


def test_load_run_from_journal_of_a_killed_run(tmp_path) -> None:
    run = write_run(tmp_path, "r1", label="int8kv", tasks=("passkey",), lengths=(4096,), depths=(0.5,),
                    samples=4, journal_only=True, duplicate_in_journal=True, status="interrupted")
    assert not (run / "results.parquet").exists()
    df = analysis.load_run(run)
    # 4 samples: the torn last line is dropped, the retried sample appears once with its successful attempt.
    assert len(df) == 4 and df["sample_id"].is_unique
    assert (df["status"] == "ok").all()
    assert set(df["label"]) == {"int8kv"} and set(df["run_status"]) == {"interrupted"}
    # The constant columns the parquet would have are rebuilt from the manifest.
    assert set(df["engine_dtype"]) == {"float16"} and set(df["backend"]) == {"trtllm"}


def test_journal_keeps_the_last_attempt(tmp_path) -> None:
    run = write_run(tmp_path, "r1", tasks=("passkey",), lengths=(4096,), depths=(0.5,), samples=1,
                    journal_only=True)
    journal = run / "journal" / "rank0.jsonl"
    row = json.loads(journal.read_text().splitlines()[0])
    later = dict(row, completion="second", score=0.0, finished_at=row["finished_at"] + 10)
    (run / "journal" / "rank1.jsonl").write_text(json.dumps(later) + "\n")
    df = analysis.load_run(run)
    assert len(df) == 1 and df["completion"].iloc[0] == "second"


def test_not_a_run_dir_is_a_one_line_usage_error(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(UsageError) as exc:
            analysis.load_runs([bad])
        assert "\n" not in str(exc.value) and str(bad) in str(exc.value)


def test_load_runs_keeps_same_labels_apart(tmp_path) -> None:
    a = write_run(tmp_path, "night1", label="llama", lengths=(4096,), depths=(0.5,), samples=2)
    b = write_run(tmp_path, "night2", label="llama", lengths=(4096,), depths=(0.5,), samples=2,
                  engine={"dtype": "float16", "kv_cache_quant_algo": "INT8"})
    df = analysis.load_runs([a, b])
    assert set(df["label"]) == {"llama (night1)", "llama (night2)"}
    assert set(df["engine_kv_cache_quant_algo"].dropna()) == {"INT8"}
    with pytest.raises(UsageError, match="given twice"):
        analysis.load_runs([a, a])


def test_load_runs_takes_one_run_dir_as_str_or_path(tmp_path) -> None:
    run = write_run(tmp_path, "one", lengths=(4096,), depths=(0.5,), samples=2)
    expected = analysis.load_runs([run])
    for given in (str(run), run):  # a str must not be read as an iterable of one-character "run dirs"
        pd.testing.assert_frame_equal(analysis.load_runs(given), expected)


def test_lazy_entry_points_are_listed_by_dir() -> None:
    import subprocess
    import sys

    code = "import evalctx, sys; print(' '.join(dir(evalctx))); print('pandas' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    names = set(out[0].split())
    assert {"load_runs", "load_run", "effective_length", "compare", "write_report", "__version__"} <= names
    assert out[1] == "False"  # listing them imports nothing heavy


@pytest.mark.parametrize("succ, n, lo, hi", [
    # Reference values of the Wilson score interval at 95% (z = 1.95996).
    (18, 20, 0.6990, 0.9721), (0, 20, 0.0, 0.1611), (20, 20, 0.8389, 1.0), (10, 20, 0.2993, 0.7007),
    (1, 1, 0.2065, 1.0),
])
def test_wilson_known_values(succ: int, n: int, lo: float, hi: float) -> None:
    got = wilson_interval(succ, n)
    assert got == pytest.approx((lo, hi), abs=1e-4)


def test_wilson_matches_scipy_for_whole_counts() -> None:
    # The formula is kept by hand because it also takes fractional successes (partial-credit scores), which
    # scipy's binomtest does not; for whole counts both must agree.
    stats = pytest.importorskip("scipy.stats")
    for n in (1, 2, 5, 20, 37, 100):
        for k in range(n + 1):
            ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
            assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9), (k, n)


def test_summary_uses_wilson_and_counts_errors_apart(tmp_path) -> None:
    run = write_run(tmp_path, "r1", lengths=(4096, 8192), depths=(0.5,), samples=20, miss_from=8192,
                    miss_rate=0.5)
    df = analysis.load_run(run)
    df.loc[df.index[:2], ["status", "score"]] = ["error", None]
    s = analysis.summary(df[df["task"] == "passkey"])
    assert list(s.columns[:4]) == ["label", "task", "context_length", "depth"]
    first = s.iloc[0]
    assert first["n"] == 18 and first["n_error"] == 2 and first["accuracy"] == 1.0
    assert (first["ci_low"], first["ci_high"]) == pytest.approx(wilson_interval(18, 18))
    second = s.iloc[1]
    succ = second["accuracy"] * second["n"]
    assert (second["ci_low"], second["ci_high"]) == pytest.approx(wilson_interval(succ, 20))


def _lengths_frame(accs: list[float], lengths: list[int] | None = None, label: str = "m", task: str = "t",
                   n: int = 100) -> pd.DataFrame:
    lengths = lengths or [4096 * 2 ** i for i in range(len(accs))]
    return pd.DataFrame({"label": label, "task": task, "context_length": lengths, "depth": 0.5,
                         "n": [0 if math.isnan(a) else n for a in accs], "accuracy": accs})


@pytest.mark.parametrize("accs, expected", [
    ([0.95, 0.90, 0.80, 0.90], 8192),        # a later pass after a failure does not count
    ([0.99, 0.97, 0.90, 0.86], 32768),       # all pass: the longest length
    ([0.80, 0.99, 0.99, 0.99], None),        # the shortest fails: "<4K"
    ([0.856, 0.8559, 1.0, 1.0], 4096),       # the threshold itself passes
    ([0.99, math.nan, 0.99, 0.99], 4096),    # a length with no scored sample (all errors) fails
])
def test_effective_length_ruler(accs: list[float], expected: int | None) -> None:
    assert analysis.effective_length(_lengths_frame(accs)) == {("m", "t"): expected}


def test_effective_length_relative_nolima() -> None:
    data = _lengths_frame([0.60, 0.55, 0.50, 0.40])  # threshold 0.85 x 0.60 = 0.51
    assert analysis.effective_length(data, relative=0.85) == {("m", "t"): 8192}
    assert analysis.effective_length(data) == {("m", "t"): None}


def test_effective_length_samples_equal_summary_and_pool_depths(tmp_path) -> None:
    run = write_run(tmp_path, "r1", lengths=(4096, 8192, 16384), depths=(0.0, 0.5, 1.0), samples=20,
                    miss_from=16384, miss_rate=0.5)
    df = analysis.load_run(run)
    from_samples = analysis.effective_length(df)
    assert from_samples == analysis.effective_length(analysis.summary(df))
    assert from_samples == {("model-a", "niah_single"): 8192, ("model-a", "passkey"): 8192}
    # Depth pooling weights by n: one bad depth among good ones can keep the pooled length above threshold.
    mixed = pd.concat([_lengths_frame([1.0, 1.0], n=90).assign(depth=0.0),
                       _lengths_frame([1.0, 0.0], n=10).assign(depth=1.0)])
    assert analysis.effective_length(mixed) == {("m", "t"): 8192}


def test_effective_length_table_uses_ruler_notation(tmp_path) -> None:
    frame = pd.concat([_lengths_frame([0.99, 0.98], label="a"), _lengths_frame([0.5, 0.4], label="b")])
    table = analysis.effective_length_table(frame).set_index("label")
    assert table.loc["a", "effective (>= 0.856)"] == ">=8K"
    assert table.loc["b", "effective (>= 0.856)"] == "<4K"
    assert table.loc["b", "effective (>= 0.85 x shortest)"] == "4K"


def test_relative_effective_length_of_a_model_failing_at_the_shortest_length_is_none() -> None:
    import pandas as pd

    from evalctx.analysis.runs import effective_length

    rows = [{"label": "m", "task": "passkey", "context_length": n, "depth": 0.5, "status": "ok", "score": 0.0,
             "latency_s": 0.1, "ttft_s": 0.05} for n in (512, 1024, 2048) for _ in range(5)]
    df = pd.DataFrame(rows)
    assert effective_length(df, relative=0.85) == {("m", "passkey"): None}
    assert effective_length(df) == {("m", "passkey"): None}


def test_readers_see_what_a_resume_would_see_after_a_killed_rerun(tmp_path) -> None:
    """Issue 23, kind 4: after a retrying rerun was killed, report, compare, show and the gate read the older
    results.parquet while the journal held newer rows, and loaded journal rows the runner refuses."""
    import time

    from evalctx.cli import main

    args = ["run", "--backend", "fake", "--tasks", "passkey", "--samples", "2", "--lengths", "512", "--out",
            str(tmp_path), "--run-id", "r", "--no-progress", "--backend-opt", "fail_every=2"]
    assert main(args) == 3
    before = analysis.load_run(tmp_path / "r")
    n_err = int((before["status"] == "error").sum())
    assert n_err > 0
    # A rerun that answered one error row and was killed before it rewrote results.parquet:
    time.sleep(0.01)
    journal = tmp_path / "r" / "journal"
    err_row = next(json.loads(line) for f in sorted(journal.glob("*.jsonl"))
                   for line in f.read_text().splitlines() if json.loads(line)["status"] == "error")
    fixed = dict(err_row, status="ok", score=1.0, completion=" 1.", error=None, finished_at=time.time() + 1)
    foreign = dict(err_row, sample_id="not-of-this-run", status="ok", score=1.0, completion=" 1.",
                   config_hash="another", finished_at=time.time() + 2)
    with (journal / "replica-9.jsonl").open("w") as fh:
        fh.write(json.dumps(fixed) + "\n" + json.dumps(foreign) + "\n")
    after = analysis.load_run(tmp_path / "r")
    assert int((after["status"] == "error").sum()) == n_err - 1
    assert "not-of-this-run" not in set(after["sample_id"]) and len(after) == len(before)
