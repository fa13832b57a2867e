"""Faults with real processes: kill -9 mid-write, torn journal tails, a full file system (a 100 KB tmpfs where this
machine lets us mount one, a file-size limit otherwise), concurrent runs, SIGTERM, a lost manifest, paths that leave
--out. Each ends with the run finished and equal, sample by sample, to an uninterrupted run."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from fault_util import (N, SUITE_80, assert_no_torn_line, journal_lines, manifest, one_line, table, tmpfs,
                        wait_for_rows)


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("suite") / "s80.toml"
    p.write_text(SUITE_80)
    return p


def cmd(suite: Path, out: Path, *extra: str, run_id: str = "r") -> list[str]:
    return [sys.executable, "-m", "evalctx.cli", "run", "--suite", str(suite), "--backend", "fake", "--tokenizer",
            "byte", "--out", str(out), "--run-id", run_id, "--no-progress", *extra]


def run(suite: Path, out: Path, *extra: str, run_id: str = "r", **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd(suite, out, *extra, run_id=run_id), capture_output=True, text=True, timeout=120,
                          **kw)  # type: ignore[call-overload]


@pytest.fixture(scope="module")
def reference(suite: Path, tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    out = tmp_path_factory.mktemp("ref")
    proc = run(suite, out)
    assert proc.returncode == 0, proc.stderr
    return table(out / "r")


# --- 1. torn journal line ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("cut", [1, pytest.param(40, marks=pytest.mark.slow), 400])
def test_torn_last_line_resumes_in_one_rerun(suite: Path, tmp_path: Path, reference: pd.DataFrame,
                                             cut: int) -> None:
    assert run(suite, tmp_path).returncode == 0
    j = tmp_path / "r" / "journal" / "replica-0.jsonl"
    j.write_bytes(j.read_bytes()[:-cut])  # cut=1: only the newline is gone, the row itself is whole
    proc = run(suite, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"complete, {0 if cut == 1 else 1} new of {N}" in proc.stdout
    assert manifest(tmp_path / "r")["status"] == "complete"
    pd.testing.assert_frame_equal(table(tmp_path / "r"), reference)
    assert journal_lines(tmp_path / "r") == N


@pytest.mark.parametrize("after_rows", [3, pytest.param(17, marks=pytest.mark.slow), 41])
def test_kill_9_mid_run_resumes_to_the_same_table(suite: Path, tmp_path: Path, reference: pd.DataFrame,
                                                  after_rows: int) -> None:
    slow = ("--backend-opt", "delay_s=0.01")  # part of the configuration: the rerun passes it too
    proc = subprocess.Popen(cmd(suite, tmp_path, *slow), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_rows(tmp_path / "r", after_rows, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert manifest(tmp_path / "r")["status"] == "running"
    again = run(suite, tmp_path, *slow)
    assert again.returncode == 0, again.stderr
    pd.testing.assert_frame_equal(table(tmp_path / "r"), reference)
    assert journal_lines(tmp_path / "r") == N  # nothing done twice


# --- 1. full disk -----------------------------------------------------------------------------------------------
def _assert_failed_and_resumable(proc: subprocess.CompletedProcess[str], run_dir: Path, needle: str) -> None:
    assert proc.returncode == 1, proc.stderr
    line = one_line(proc.stderr)
    assert needle in line and "marked failed" in line and "rerun the same command" in line
    m = manifest(run_dir)
    assert m["status"] == "failed" and needle in m["stopped_by"]
    assert_no_torn_line(run_dir)  # the failed batch was cut back


def test_full_disk_ends_failed_in_one_line_and_resumes(suite: Path, tmp_path: Path,
                                                       reference: pd.DataFrame) -> None:
    mnt = tmp_path / "small"
    with tmpfs(mnt, "size=100k") as mounted:
        if not mounted:
            pytest.skip("cannot mount a tmpfs here (test_file_size_limit covers a failing write)")
        proc = run(suite, mnt)
        _assert_failed_and_resumable(proc, mnt / "r", "No space left on device")
        assert 0 < journal_lines(mnt / "r") < N
        subprocess.run(["mount", "-o", "remount,size=4m", str(mnt)], check=True)
        again = run(suite, mnt)
        assert again.returncode == 0, again.stderr
        pd.testing.assert_frame_equal(table(mnt / "r"), reference)
        assert journal_lines(mnt / "r") == N


def test_file_size_limit_ends_failed_in_one_line_and_resumes(suite: Path, tmp_path: Path,
                                                             reference: pd.DataFrame) -> None:
    def limit() -> None:  # the journal (~75 KB for 80 rows) outgrows it; the manifest and the ballast do not
        resource.setrlimit(resource.RLIMIT_FSIZE, (66_000, resource.RLIM_INFINITY))

    proc = subprocess.run(cmd(suite, tmp_path), capture_output=True, text=True, timeout=120, preexec_fn=limit)
    _assert_failed_and_resumable(proc, tmp_path / "r", "File too large")
    again = run(suite, tmp_path)
    assert again.returncode == 0, again.stderr
    pd.testing.assert_frame_equal(table(tmp_path / "r"), reference)


def generate(suite: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "evalctx.cli", "generate", "--suite", str(suite), "--tokenizer", "byte", "--out",
            str(out), "--no-progress"]


def test_generate_on_a_full_disk_leaves_no_partial_file(suite: Path, tmp_path: Path) -> None:
    """It wrote straight into --out: a full disk left 53 KB cut mid-line, which reads as a smaller suite."""
    with tmpfs(tmp_path / "small", "size=50k") as mounted:
        if not mounted:
            pytest.skip("cannot mount a tmpfs here")
        proc = subprocess.run(generate(suite, tmp_path / "small" / "g.jsonl"), capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines()[-1] == \
            f"evalctx: error: --out {tmp_path / 'small' / 'g.jsonl'}: No space left on device"
        assert list((tmp_path / "small").iterdir()) == []


def test_generate_stopped_by_sigterm_leaves_no_partial_file(tmp_path: Path) -> None:
    big = tmp_path / "big.toml"
    big.write_text('name = "big"\n[[tasks]]\ntask = "passkey"\nlengths = [200000]\ndepths = [0.5]\nsamples = 50\n')
    out = tmp_path / "g.jsonl"
    proc = subprocess.Popen(generate(big, out), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not any(p.stat().st_size for p in tmp_path.glob(".g.jsonl.*.tmp")):  # some samples written
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "evalctx: interrupted (SIGTERM)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.toml"]


# --- 2. concurrent runs -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 3])
def test_concurrent_identical_runs_one_works_the_others_exit_2(suite: Path, tmp_path: Path,
                                                               reference: pd.DataFrame, n: int) -> None:
    procs = [subprocess.Popen(cmd(suite, tmp_path, "--backend-opt", "delay_s=0.02"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(n)]
    results = [(p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for p in procs]  # type: ignore[union-attr]
    codes = sorted(r[0] for r in results)
    assert codes == [0] + [2] * (n - 1), results
    for code, _, err in results:
        if code == 2:
            assert "is in use by pid" in one_line(err) and "its command: evalctx run" in err
    pd.testing.assert_frame_equal(table(tmp_path / "r"), reference)
    assert journal_lines(tmp_path / "r") == N
    assert not list((tmp_path / "r").glob(".*.tmp"))


# --- 6. bad state ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [5, [1]])
def test_journal_column_of_mixed_types_is_one_line_exit_2(suite: Path, tmp_path: Path, value: object) -> None:
    """A backend column (``model``) of another type in one row: results.parquet cannot hold it. It was a pyarrow
    traceback after the run; now one line, exit 2, every journaled sample kept."""
    assert run(suite, tmp_path).returncode == 0
    j = tmp_path / "r" / "journal" / "replica-0.jsonl"
    lines = j.read_text().splitlines()
    lines[3] = json.dumps(dict(json.loads(lines[3]), model=value))
    j.write_text("\n".join(lines) + "\n")
    proc = run(suite, tmp_path)
    assert proc.returncode == 2 and "column model" in one_line(proc.stderr) and "remove that line" in proc.stderr
    assert journal_lines(tmp_path / "r") == N


# --- 3. identity without a manifest -----------------------------------------------------------------------------
def test_rows_of_another_configuration_are_never_adopted(suite: Path, tmp_path: Path) -> None:
    assert run(suite, tmp_path, "--backend-opt", "mode=constant").returncode == 0  # every answer wrong
    (tmp_path / "r" / "manifest.json").unlink()
    proc = run(suite, tmp_path)  # the oracle, same --run-id
    assert proc.returncode == 2
    assert "no manifest.json and its journals hold rows of another configuration" in one_line(proc.stderr)
    assert journal_lines(tmp_path / "r") == N
    again = run(suite, tmp_path, "--backend-opt", "mode=constant")  # the same configuration still resumes
    assert again.returncode == 0 and f"0 new of {N}" in again.stdout


def test_journal_rows_without_a_hash_and_no_manifest_are_refused(suite: Path, tmp_path: Path) -> None:
    assert run(suite, tmp_path).returncode == 0
    j = tmp_path / "r" / "journal" / "replica-0.jsonl"
    old = [{k: v for k, v in json.loads(line).items() if k != "config_hash"} for line in j.read_text().splitlines()]
    j.write_text("".join(json.dumps(r) + "\n" for r in old))  # as evalctx wrote them before rows carried it
    (tmp_path / "r" / "manifest.json").unlink()
    proc = run(suite, tmp_path)
    assert proc.returncode == 2 and "none (rows older than the hash)" in one_line(proc.stderr)


def test_resume_under_another_label_renames_the_whole_run(suite: Path, tmp_path: Path) -> None:
    """The label is no part of the configuration, so --label B resumes --label A's run; its rows kept label A and
    load_runs split one run into two models (62 rows 'A', 18 rows 'B')."""
    from evalctx import load_runs

    assert run(suite, tmp_path, "--label", "A").returncode == 0
    j = tmp_path / "r" / "journal" / "replica-0.jsonl"
    j.write_text("".join(j.read_text().splitlines(keepends=True)[:30]))  # as a stop after 30 samples leaves it
    proc = run(suite, tmp_path, "--label", "B")
    assert proc.returncode == 0 and f"50 new of {N}" in proc.stdout
    assert set(pd.read_parquet(tmp_path / "r" / "results.parquet")["label"]) == {"B"}
    assert manifest(tmp_path / "r")["label"] == "B"
    (tmp_path / "r" / "results.parquet").unlink()  # an interrupted run is read from its journal
    assert set(load_runs([tmp_path / "r"])["label"]) == {"B"}


# --- 4. paths ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("run_id", ["../../escaped", "/tmp/evalctx-absolute-escape", "a/b", ".."])
def test_run_id_is_a_name_never_a_path(suite: Path, tmp_path: Path, run_id: str) -> None:
    out = tmp_path / "a" / "b" / "out"
    proc = run(suite, out, run_id=run_id)
    assert proc.returncode == 2 and "is not a name" in one_line(proc.stderr)
    assert not Path("/tmp/evalctx-absolute-escape").exists()
    assert list(tmp_path.rglob("*")) == []  # refused before anything was created


def test_suite_name_is_a_name_never_a_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "../../../x"\n' + SUITE_80.split("\n", 1)[1])
    out = tmp_path / "a" / "b" / "out"
    proc = subprocess.run([sys.executable, "-m", "evalctx.cli", "run", "--suite", str(bad), "--backend", "fake",
                           "--tokenizer", "byte", "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "name '../../../x' is not a name" in one_line(proc.stderr)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["bad.toml"]


# --- 7. signals -------------------------------------------------------------------------------------------------
def test_sigterm_is_handled_like_ctrl_c(suite: Path, tmp_path: Path, reference: pd.DataFrame) -> None:
    slow = ("--backend-opt", "delay_s=0.02")
    proc = subprocess.Popen(cmd(suite, tmp_path, *slow), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_rows(tmp_path / "r", 5, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert one_line(err).startswith("evalctx: interrupted (SIGTERM); finished samples are in the journal")
    m = manifest(tmp_path / "r")
    assert m["status"] == "interrupted" and m["stopped_by"] == "SIGTERM" and m["finished_at"]
    assert not lock_held(tmp_path / "r")
    again = run(suite, tmp_path, *slow)
    assert again.returncode == 0
    pd.testing.assert_frame_equal(table(tmp_path / "r"), reference)


def lock_held(run_dir: Path) -> bool:
    from evalctx.results.lock import is_held

    return is_held(run_dir)


# --- 8. file modes ----------------------------------------------------------------------------------------------
def test_outputs_follow_the_umask(suite: Path, tmp_path: Path) -> None:
    proc = run(suite, tmp_path, preexec_fn=lambda: os.umask(0o002))
    assert proc.returncode == 0
    for name in ("manifest.json", "summary.csv", "results.parquet", "journal/replica-0.jsonl"):
        assert oct((tmp_path / "r" / name).stat().st_mode & 0o777) == oct(0o664), name


def test_generate_refuses_a_directory_up_front_and_cleans_what_a_killed_one_left(tmp_path, capsys) -> None:
    """Issue 23, kind 3: `generate --out /tmp` built everything, then failed; a killed generate left its temporary
    file for good."""
    import subprocess
    import sys

    from evalctx.cli import main

    assert main(["generate", "--suite", "passkey", "--lengths", "4096", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "is a directory" in capsys.readouterr().err
    out = tmp_path / "s.jsonl"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".s.jsonl.{dead.pid}-abcd1234.tmp"
    stale.write_text("partial")
    assert main(["generate", "--suite", "passkey", "--lengths", "4096", "--tasks", "passkey", "--out", str(out),
                 "--no-progress"]) == 0
    assert not stale.exists() and out.stat().st_size > 0
    assert "left by a killed generate" in capsys.readouterr().err


def test_generate_writes_through_a_symlink_and_into_a_fifo(tmp_path) -> None:
    """A rename onto --out replaced /dev/null, a symlink and a FIFO with a regular file (review of issue 23)."""
    import os
    import stat
    import threading

    from evalctx.cli import main

    args = ["generate", "--suite", "passkey", "--lengths", "4096", "--tasks", "passkey", "--no-progress", "--out"]
    target = tmp_path / "target.jsonl"
    target.write_text("old")
    (tmp_path / "link.jsonl").symlink_to(target)
    assert main(args + [str(tmp_path / "link.jsonl")]) == 0
    assert (tmp_path / "link.jsonl").is_symlink() and target.read_text().startswith('{"id"')
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    assert main(args + [str(fifo)]) == 0
    reader.join(30)
    assert stat.S_ISFIFO(fifo.stat().st_mode) and got and got[0].startswith(b'{"id"')
