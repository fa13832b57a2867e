"""The run directory's files on their own: torn tails, failed appends, journal identity and shape, manifests in bad
state, run ids as names, file modes and temporary names. Real files throughout; a failing write is injected where
the kernel cannot be made to fail on cue (the tmpfs and file-size-limit tests in test_faults.py use real ones)."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest

from evalctx.errors import UsageError
from evalctx.results import journal, lock, rundir

ROW = {"sample_id": "s1", "task": "passkey", "status": "ok", "context_length": 300, "depth": 0.5, "score": 1.0,
       "completion": " 1.", "finished_at": 1.0}


def rows(n: int, **over: object) -> list[dict]:
    return [dict(ROW, sample_id=f"s{i}", finished_at=float(i), **over) for i in range(n)]


def journal_file(run_dir: Path, name: str = "replica-0") -> Path:
    return run_dir / "journal" / f"{name}.jsonl"


# --- torn tails -------------------------------------------------------------------------------------------------
def test_torn_tail_is_cut_so_the_next_append_is_readable(tmp_path: Path) -> None:
    j = journal.Journal(tmp_path, "replica-0", "h1")
    j.append(rows(3))
    j.close()
    p = journal_file(tmp_path)
    data = p.read_bytes()
    p.write_bytes(data[:-25])  # the last row lost its end, as a kill -9 or a full disk leaves it
    assert len(journal.read_journals(tmp_path)) == 2
    assert journal.repair_tail(p) > 0
    j = journal.Journal(tmp_path, "replica-0", "h1")
    j.append([dict(ROW, sample_id="s2", finished_at=9.0)])
    j.close()
    got = journal.read_journals(tmp_path, "h1")
    assert sorted(got) == ["s0", "s1", "s2"]  # without the repair, s2 would be glued to the torn line and lost
    assert p.read_bytes().endswith(b"\n") and p.read_bytes().count(b"\n") == 3


def test_whole_row_missing_only_its_newline_is_kept(tmp_path: Path) -> None:
    p = journal_file(tmp_path)
    p.parent.mkdir(parents=True)
    p.write_text(json.dumps(dict(ROW, sample_id="a")) + "\n" + json.dumps(dict(ROW, sample_id="b")))
    assert journal.repair_tail(p) == 0
    assert sorted(journal.read_journals(tmp_path)) == ["a", "b"]


def test_repair_notes_name_the_file(tmp_path: Path) -> None:
    p = journal_file(tmp_path)
    p.parent.mkdir(parents=True)
    p.write_text(json.dumps(ROW) + '\n{"sample_id": "x", "ta')
    notes = journal.repair_journals(tmp_path)
    assert len(notes) == 1 and "replica-0.jsonl" in notes[0] and "torn" in notes[0]
    assert journal.repair_journals(tmp_path) == []


def test_garbled_middle_line_is_skipped_and_noted(tmp_path: Path) -> None:
    p = journal_file(tmp_path)
    p.parent.mkdir(parents=True)
    p.write_text(json.dumps(dict(ROW, sample_id="a")) + "\n" + '{"sample_id": "b", "ta{"sample_id"\n'
                 + json.dumps(dict(ROW, sample_id="c")) + "\n")
    problems: list[str] = []
    assert sorted(journal.read_journals(tmp_path, problems=problems)) == ["a", "c"]
    assert len(problems) == 1 and ":2:" in problems[0]


# --- failed appends ---------------------------------------------------------------------------------------------
def test_failed_append_is_cut_back_and_raises_storage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    j = journal.Journal(tmp_path, "replica-0", "h1")
    j.append(rows(2))
    size = journal_file(tmp_path).stat().st_size
    real_write = os.write
    calls = {"n": 0}

    def full_after_some_bytes(fd: int, data: bytes) -> int:  # ENOSPC after a partial write, as ext4 does
        calls["n"] += 1
        if calls["n"] == 1:
            return real_write(fd, bytes(data[:40]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full_after_some_bytes)
    with pytest.raises(rundir.StorageError, match="No space left on device") as exc:
        j.append(rows(5))
    monkeypatch.undo()
    assert exc.value.errno == errno.ENOSPC and "replica-0.jsonl" in str(exc.value)
    assert journal_file(tmp_path).stat().st_size == size  # no torn line left behind
    j.append([dict(ROW, sample_id="later", finished_at=99.0)])
    j.close()
    assert sorted(journal.read_journals(tmp_path)) == ["later", "s0", "s1"]


def test_interrupt_mid_append_leaves_no_torn_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    j = journal.Journal(tmp_path, "replica-0", "h1")
    real_write = os.write

    def interrupted(fd: int, data: bytes) -> int:
        real_write(fd, bytes(data[:10]))
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        j.append(rows(1))
    monkeypatch.undo()
    j.close()
    assert journal_file(tmp_path).stat().st_size == 0


# --- identity and shape -----------------------------------------------------------------------------------------
def test_rows_carry_the_config_hash_and_other_configs_are_left_out(tmp_path: Path) -> None:
    for name, h in (("replica-0", "mine"), ("replica-1", "other")):
        j = journal.Journal(tmp_path, name, h)
        j.append([dict(ROW, sample_id=f"{name}-x")])
        j.close()
    assert journal.journal_config_hashes(tmp_path) == {"mine", "other"}
    problems: list[str] = []
    assert list(journal.read_journals(tmp_path, "mine", problems)) == ["replica-0-x"]
    assert "1 journal row(s) of another configuration" in problems[0]


@pytest.mark.parametrize("field, value", [("context_length", "abc"), ("context_length", True), ("depth", "x"),
                                          ("status", 3), ("score", "1.0"), ("finished_at", [1]),
                                          # every results column is checked, not only the ones resume reads:
                                          # these broke results.parquet with a traceback after the run's work
                                          ("target", 5), ("target", ["a", 1]), ("flags", "x"), ("completion", 7),
                                          ("latency_s", "x"), ("replica", "a"), ("task_options", 3)])
def test_rows_of_the_wrong_type_are_one_line_errors(tmp_path: Path, field: str, value: object) -> None:
    p = journal_file(tmp_path)
    p.parent.mkdir(parents=True)
    p.write_text(json.dumps(ROW) + "\n" + json.dumps(dict(ROW, sample_id="b", **{field: value})) + "\n")
    with pytest.raises(UsageError, match=f"replica-0.jsonl:2: journal row has {field}=") as exc:
        journal.read_journals(tmp_path)
    assert "\n" not in str(exc.value)


def test_row_lacking_a_field_is_an_error(tmp_path: Path) -> None:
    p = journal_file(tmp_path)
    p.parent.mkdir(parents=True)
    p.write_text(json.dumps({k: v for k, v in ROW.items() if k != "task"}) + "\n")
    with pytest.raises(UsageError, match="lacks 'task'"):
        journal.read_journals(tmp_path)


def test_journal_that_is_a_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "journal").write_text("x")
    with pytest.raises(UsageError, match="is a file, not the journal folder"):
        journal.read_journals(tmp_path)
    with pytest.raises(UsageError, match="is a file"):
        journal.Journal(tmp_path, "replica-0", "h")


@pytest.mark.parametrize("content, needle", [("{bad", "not valid JSON"), ("", "not valid JSON"),
                                             ("[1, 2]", "holds a JSON list"), ("\xff\xfe", "unreadable")])
def test_bad_manifest_is_a_one_line_error(tmp_path: Path, content: str, needle: str) -> None:
    (tmp_path / "manifest.json").write_bytes(content.encode("latin-1"))
    with pytest.raises(UsageError, match=needle) as exc:
        rundir.read_manifest(tmp_path)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("field, value, want", [("label", 5, "string or null"), ("created_at", [1], "string"),
                                                 ("suite", 3, "object or null"), ("n_samples", "80", "number")])
def test_manifest_field_of_the_wrong_type_is_a_one_line_error(tmp_path: Path, field: str, value: object,
                                                              want: str) -> None:
    """A field evalctx reads back, of another type: it was a traceback in report, show, compare or the gate."""
    (tmp_path / "manifest.json").write_text(json.dumps({"status": "complete", field: value}))
    with pytest.raises(UsageError, match=f"manifest.json: {field} is .*, not {want}") as exc:
        rundir.read_manifest(tmp_path)
    assert "\n" not in str(exc.value)


def test_mark_stopped_only_touches_this_attempts_running_manifest(tmp_path: Path) -> None:
    rundir.write_manifest(tmp_path, {"status": "running", "attempt_id": "a1"})
    rundir.mark_stopped(tmp_path, "interrupted", "other-attempt", "SIGTERM")
    assert rundir.read_manifest(tmp_path)["status"] == "running"
    rundir.mark_stopped(tmp_path, "interrupted", "a1", "SIGTERM")
    m = rundir.read_manifest(tmp_path)
    assert m["status"] == "interrupted" and m["stopped_by"] == "SIGTERM" and m["finished_at"]
    rundir.mark_stopped(tmp_path, "failed", "a1", "x")  # a finished status is never overwritten
    assert rundir.read_manifest(tmp_path)["status"] == "interrupted"


# --- names ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../../x", "/abs/path", "a/b", "..", ".", ".hidden", "-rf", "", "a\\b", "x\ny",
                                  "x" * 201])
def test_paths_are_not_names(name: str) -> None:
    with pytest.raises(UsageError, match="is not a name"):
        rundir.check_name(name, "--run-id")


@pytest.mark.parametrize("name", ["nightly-20260101T020000Z", "passkey-tiny-0123abcdef01", "Llama 3.1 (8B)",
                                  "a.b_c+d", "ünïcode"])
def test_names_are_names(name: str) -> None:
    assert rundir.check_name(name, "--run-id") == name


def test_label_part_of_a_derived_run_id_is_made_a_name() -> None:
    assert rundir.check_name(rundir.safe_name_part("..\\evil\x00/x"), "id")


# --- modes and temporary names ----------------------------------------------------------------------------------
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_files_follow_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    pd = pytest.importorskip("pandas")
    old = os.umask(umask)
    try:
        rundir.write_manifest(tmp_path, {"a": 1})
        rundir.atomic_write_text(tmp_path / rundir.SUMMARY, "x\n")
        rundir.atomic_write_parquet(pd.DataFrame({"a": [1]}), tmp_path / rundir.RESULTS)
        j = journal.Journal(tmp_path, "replica-0", "h")
        j.close()
        owner = lock.acquire(tmp_path, "test", "now")
        owner.release()
    finally:
        os.umask(old)
    for name in (rundir.MANIFEST, rundir.SUMMARY, rundir.RESULTS, "journal/replica-0.jsonl", lock.LOCK):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


def test_temporary_names_are_unique_and_stale_ones_are_cleared(tmp_path: Path) -> None:
    names = {rundir._tmp_path(tmp_path / "results.parquet").name for _ in range(200)}
    assert len(names) == 200 and all(n.startswith(".results.parquet.") for n in names)
    (tmp_path / ".manifest.json.123-abcd.tmp").write_text("left by a kill -9")
    (tmp_path / "keep.txt").write_text("x")
    rundir.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


# --- the lock (flock is per open file, so one process can play two commands) ------------------------------------
def test_second_owner_is_refused_naming_the_holder(tmp_path: Path) -> None:
    first = lock.acquire(tmp_path, "evalctx run --run-id r", "2026-01-01T00:00:00+00:00")
    assert lock.is_held(tmp_path)
    with pytest.raises(UsageError, match=rf"in use by pid {os.getpid()} on .* since 2026-01-01T00:00:00\+00:00: "
                                         r"wait .*; its command: evalctx run --run-id r"):
        lock.acquire(tmp_path, "other", "now")
    first.release()
    assert not lock.is_held(tmp_path)
    lock.acquire(tmp_path, "again", "now").release()


def test_live_journal_writer_of_an_earlier_command_blocks_a_new_one(tmp_path: Path) -> None:
    old = lock.acquire(tmp_path, "evalctx run (old)", "t0")
    writer = lock.join_writers(tmp_path, old.attempt_id)
    old.release()  # rank 0 of the old command died; one of its ranks still writes
    with pytest.raises(UsageError, match=r"ranks of an earlier command .* still writing journals.*\(old\)"):
        lock.acquire(tmp_path, "evalctx run (new)", "t1")
    os.close(writer)
    new = lock.acquire(tmp_path, "evalctx run (new)", "t1")
    with pytest.raises(UsageError, match="was taken by"):  # an old rank that starts late stops before writing
        lock.join_writers(tmp_path, old.attempt_id)
    os.close(lock.join_writers(tmp_path, new.attempt_id))
    new.release()


def test_a_command_line_longer_than_a_page_does_not_look_like_a_taken_lock(tmp_path) -> None:
    """The lock file holds the whole command line; a read of 4096 bytes cut it and a run with a long label refused
    to start, "taken by another process" (issue 23, kind 7)."""
    from evalctx.cli import main

    label = "x" * 6000
    assert main(["run", "--backend", "fake", "--samples", "1", "--lengths", "512", "--tasks", "passkey", "--out",
                 str(tmp_path), "--run-id", "long", "--label", label, "--no-progress"]) == 0
    assert main(["run", "--backend", "fake", "--samples", "1", "--lengths", "512", "--tasks", "passkey", "--out",
                 str(tmp_path), "--run-id", "long", "--label", label, "--no-progress"]) == 0


def test_journal_rows_that_cannot_be_right_are_not_taken(tmp_path) -> None:
    """Issue 23, kind 10: a duplicated id with a different ok answer silently replaced the first; an ok row without
    a completion was accepted; a deeply nested suite gave a RecursionError traceback."""
    import json as _json

    import pytest as _pytest

    from evalctx.config import load_suite
    from evalctx.errors import UsageError
    from evalctx.results import journal

    j = tmp_path / "journal"
    j.mkdir()
    base = {"sample_id": "a", "task": "passkey", "context_length": 512, "depth": 0.5, "status": "ok",
            "score": 1.0, "completion": " 12345.", "finished_at": 1.0}
    rows = [base, {**base, "completion": " 99999.", "score": 0.0, "finished_at": 2.0},
            {**base, "sample_id": "b", "completion": None}]
    (j / "replica-0.jsonl").write_text("".join(_json.dumps(r) + "\n" for r in rows))
    problems: list[str] = []
    got = journal.read_journals(tmp_path, problems=problems)
    assert got["a"]["completion"] == " 99999." and "b" not in got
    assert any("answered twice with different answers" in p for p in problems)
    assert any("ok without a completion and a score" in p for p in problems)
    deep = tmp_path / "deep.toml"
    deep.write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
    with _pytest.raises(UsageError, match="nested too deeply"):
        load_suite(str(deep))
