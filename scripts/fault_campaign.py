"""Fault campaign for the run directory and what surrounds it: real processes killed, signalled, starved of disk and
raced, counted. Round 2 (issue 23) adds the nightly history, readers after a killed rerun, the gate on unfinished
runs, secrets a server quotes, answers a server never ends, and evalctx serve's bad requests.

    python scripts/fault_campaign.py [--seed 0] [--only KIND ...]

Each case breaks a run of an 80-sample suite (fake backend, byte tokenizer) in one way, checks what the issue asks
(one line and the right exit code, the manifest's status, no torn journal line, no sample done twice) and then
that the same command finishes it with a table equal, sample by sample, to an uninterrupted run. It prints one
line per case and "tried N, held M". Needs mpirun for the MPI kinds and root (mount) for the tmpfs kinds; kinds
that cannot run here are skipped and not counted. The CI tests (tests/test_faults.py, test_mpi_faults.py,
test_bad_input.py, test_serve_bounds.py) check one case of each kind; this runs many, at random moments.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import pandas as pd  # noqa: E402
from fault_util import (N, SUITE_80, assert_no_torn_line, journal_lines, manifest, one_line, table,  # noqa: E402
                        tmpfs, wait_for_rows)
from mpi_util import find_mpirun, mpi_env  # noqa: E402

PY = sys.executable
ENV = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
Case = Callable[[Path], "str | None"]
"""A case: breaks a run in work folder, checks, finishes it; may return a note on what it met."""


class Campaign:
    def __init__(self, root: Path, rng: random.Random) -> None:
        self.root = root
        self.rng = rng
        self.suite = root / "s80.toml"
        self.suite.write_text(SUITE_80)
        self.results: list[tuple[str, str, bool, str]] = []
        proc = self.run(root / "reference")
        assert proc.returncode == 0, proc.stderr
        self.reference = table(root / "reference" / "r")

    # --- commands -----------------------------------------------------------------------------------------------
    def argv(self, out: Path, *extra: str, run_id: str = "r") -> list[str]:
        return ["run", "--suite", str(self.suite), "--backend", "fake", "--tokenizer", "byte", "--out", str(out),
                "--run-id", run_id, "--no-progress", *extra]

    def cmd(self, out: Path, *extra: str, ranks: int = 0) -> list[str]:
        if ranks:
            flags = ["--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
            return [str(find_mpirun()), *flags, "-n", str(ranks), PY, "-m", "evalctx.cli", *self.argv(out, *extra)]
        return [PY, "-m", "evalctx.cli", *self.argv(out, *extra)]

    def run(self, out: Path, *extra: str, ranks: int = 0, **kw: object) -> subprocess.CompletedProcess[str]:
        env = mpi_env() | {"PYTHONPATH": ENV["PYTHONPATH"]} if ranks else ENV
        return subprocess.run(self.cmd(out, *extra, ranks=ranks), capture_output=True, text=True, timeout=300,
                              env=env, **kw)  # type: ignore[call-overload]

    def start(self, out: Path, *extra: str, ranks: int = 0, **kw: object) -> subprocess.Popen[str]:
        env = mpi_env() | {"PYTHONPATH": ENV["PYTHONPATH"]} if ranks else ENV
        return subprocess.Popen(self.cmd(out, *extra, ranks=ranks), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env=env, **kw)  # type: ignore[call-overload]

    def finish(self, out: Path, *extra: str, ranks: int = 0, patience_s: float = 90) -> None:
        """Rerun until done (a refusal only while ranks of a killed job still write); then compare."""
        deadline = time.monotonic() + patience_s
        while True:
            proc = self.run(out, *extra, ranks=ranks)
            if proc.returncode != 2 or "still writing" not in proc.stderr and "in use by" not in proc.stderr:
                break
            assert time.monotonic() < deadline, "run dir still held after the patience"
            time.sleep(0.5)
        assert proc.returncode == 0, f"rerun exit {proc.returncode}: {proc.stderr.strip()[-300:]}"
        assert manifest(out / "r")["status"] == "complete"
        pd.testing.assert_frame_equal(table(out / "r"), self.reference)
        assert journal_lines(out / "r") == N, f"{journal_lines(out / 'r')} journal rows for {N} samples"

    # --- bookkeeping --------------------------------------------------------------------------------------------
    def case(self, kind: str, name: str, fn: Case) -> None:
        work = Path(tempfile.mkdtemp(dir=self.root, prefix=f"{kind}-"))
        try:
            held, why = True, fn(work) or ""
        except Exception as exc:  # a case that does not hold is reported, and the campaign goes on
            held, why = False, f"{type(exc).__name__}: {exc}"[:400]
            if os.environ.get("CAMPAIGN_TRACEBACK"):
                traceback.print_exc()
        self.results.append((kind, name, held, why))
        print(f"{'held ' if held else 'BROKE'} {kind:<14} {name} {why}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
def kill9_single(c: Campaign, rows: int) -> Case:
    def case(w: Path) -> str | None:
        slow = ("--backend-opt", "delay_s=0.005")
        p = c.start(w, *slow)
        wait_for_rows(w / "r", rows, p)
        p.kill()
        p.wait()
        c.finish(w, *slow)
    return case


def kill9_mpi(c: Campaign, ranks: int, rows: int, resume_ranks: int) -> Case:
    def case(w: Path) -> str | None:
        slow = ("--backend-opt", "delay_s=0.02")
        p = c.start(w, *slow, ranks=ranks, start_new_session=True)
        wait_for_rows(w / "r", rows, p)
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        c.finish(w, *slow, ranks=resume_ranks if resume_ranks > 1 else 0)
    return case


def torn_tail(c: Campaign, cut: int, which: str = "replica-0", ranks: int = 0, zeros: int = 0) -> Case:
    def case(w: Path) -> str | None:
        assert c.run(w, ranks=ranks).returncode == 0
        j = w / "r" / "journal" / f"{which}.jsonl"
        data = j.read_bytes()
        j.write_bytes(data[:-cut] + b"\0" * zeros)  # zeros: what a crash can leave past the end of a file
        proc = c.run(w)
        assert proc.returncode == 0 and "complete" in proc.stdout, proc.stderr
        c.finish(w)  # and the same command again: 0 new
    return case


def full_disk(c: Campaign, size: str, ranks: int = 0) -> Case:
    def case(w: Path) -> str | None:
        mnt = w / "mnt"
        with tmpfs(mnt, f"size={size}") as mounted:
            assert mounted, "cannot mount a tmpfs"
            proc = c.run(mnt, ranks=ranks)
            if ranks:
                assert proc.returncode != 0 and "No space left on device" in proc.stderr, proc.stderr
                assert "Traceback" not in proc.stderr
            else:
                assert proc.returncode in (1, 2), proc.stderr
                line = one_line(proc.stderr)
                assert "No space left on device" in line, line
            if proc.returncode != 2:
                assert manifest(mnt / "r")["status"] == "failed"
                assert_no_torn_line(mnt / "r")
            subprocess.run(["mount", "-o", "remount,size=8m", str(mnt)], check=True)
            c.finish(mnt, ranks=ranks)
    return case


def file_size_limit(c: Campaign, limit: int) -> Case:
    def case(w: Path) -> str | None:
        proc = c.run(w, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
        assert proc.returncode == 1 and "File too large" in one_line(proc.stderr), proc.stderr
        assert manifest(w / "r")["status"] == "failed"
        assert_no_torn_line(w / "r")
        c.finish(w)
    return case


def concurrent(c: Campaign, n: int) -> Case:
    def case(w: Path) -> str | None:
        slow = ("--backend-opt", "delay_s=0.01")
        procs = []
        for _ in range(n):
            procs.append(c.start(w, *slow))
            time.sleep(c.rng.uniform(0, 0.4))
        outs = [(p.wait(timeout=300), p.stderr.read()) for p in procs]  # type: ignore[union-attr]
        codes = [o[0] for o in outs]
        assert set(codes) <= {0, 2} and 0 in codes, outs
        for code, err in outs:
            if code == 2:
                assert "is in use by pid" in one_line(err), err
        assert not list((w / "r").glob(".*.tmp"))
        c.finish(w, *slow)
    return case


def sig_single(c: Campaign, sig: signal.Signals, rows: int) -> Case:
    def case(w: Path) -> str | None:
        slow = ("--backend-opt", "delay_s=0.01")
        p = c.start(w, *slow)
        wait_for_rows(w / "r", rows, p)
        p.send_signal(sig)
        err = p.communicate(timeout=60)[1]
        assert p.returncode == 130, (p.returncode, err)
        assert one_line(err).startswith(f"evalctx: interrupted ({sig.name})")
        m = manifest(w / "r")
        assert m["status"] == "interrupted" and m["stopped_by"] == sig.name, m["status"]
        assert_no_torn_line(w / "r")
        c.finish(w, *slow)
    return case


def sig_mpirun(c: Campaign, sig: signal.Signals, ranks: int) -> Case:
    def case(w: Path) -> str | None:
        slow = ("--backend-opt", "delay_s=0.05")
        p = c.start(w, *slow, ranks=ranks, start_new_session=True)
        wait_for_rows(w / "r", c.rng.randint(2, 20), p)
        p.send_signal(sig)
        p.wait(timeout=60)
        assert manifest(w / "r")["status"] == "interrupted", manifest(w / "r")["status"]
        assert_no_torn_line(w / "r")
        c.finish(w, *slow, ranks=ranks)
    return case


def sig_run_eval(c: Campaign, sig: signal.Signals) -> Case:
    def case(w: Path) -> str | None:
        env = dict(ENV, PATH=f"{Path(PY).parent}{os.pathsep}{os.environ['PATH']}")
        args = c.argv(w, "--backend-opt", "delay_s=0.05")[1:]
        p = subprocess.Popen([str(REPO / "run_eval.sh"), "-n", "2", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, env=env)
        wait_for_rows(w / "r", 4, p)
        p.send_signal(sig)
        err = p.communicate(timeout=60)[1]
        assert p.returncode == 130, (p.returncode, err)
        assert f"run_eval.sh: interrupted ({sig.name})" in err.splitlines()[-1], err
        assert manifest(w / "r")["status"] == "interrupted"
        c.finish(w, "--backend-opt", "delay_s=0.05", ranks=2)
    return case


def stray_ranks(c: Campaign) -> Case:
    def case(w: Path) -> str | None:
        slow = ("--backend-opt", "delay_s=0.1")
        p = c.start(w, *slow, ranks=3, start_new_session=True)
        wait_for_rows(w / "r", c.rng.randint(3, 12), p)
        rank0 = json.loads((w / "r" / ".lock").read_text())["pid"]
        os.kill(p.pid, signal.SIGKILL)
        os.kill(rank0, signal.SIGKILL)
        p.wait()
        early = c.run(w, *slow)
        assert early.returncode in (0, 2), early.stderr
        if early.returncode == 2:
            assert "still writing journals" in one_line(early.stderr)
        c.finish(w, *slow)
        return "(refused while they wrote)" if early.returncode == 2 else "(they were gone already)"
    return case


def lost_manifest(c: Campaign, opt: str) -> Case:
    def case(w: Path) -> str | None:
        assert c.run(w, "--backend-opt", opt).returncode == 0
        (w / "r" / "manifest.json").unlink()
        proc = c.run(w)
        assert proc.returncode == 2 and "another configuration" in one_line(proc.stderr)
        assert journal_lines(w / "r") == N
        again = c.run(w, "--backend-opt", opt)
        assert again.returncode == 0 and f"0 new of {N}" in again.stdout
    return case


def bad_state(c: Campaign, spoil: Callable[[Path], None], needle: str) -> Case:
    def case(w: Path) -> str | None:
        assert c.run(w).returncode == 0
        spoil(w / "r")
        proc = c.run(w)
        assert proc.returncode == 2 and needle in one_line(proc.stderr), proc.stderr
    return case


def bad_input(c: Campaign, argv: list[str], needle: str) -> Case:
    def case(w: Path) -> str | None:
        proc = subprocess.run([PY, "-m", "evalctx.cli", *[a.replace("{w}", str(w)) for a in argv]],
                              capture_output=True, text=True, timeout=120, env=ENV)
        assert proc.returncode == 2 and needle in one_line(proc.stderr), proc.stderr
        assert not any(p.name.startswith(("x", "escaped")) for p in w.parent.iterdir())
    return case


def serve_case(kind: str) -> Case:
    def case(w: Path) -> str | None:
        import test_serve_bounds as sb

        if kind == "burst":
            sb.test_a_burst_of_100_connections_is_answered()
        elif kind == "half-sent-300":
            srv = sb.server(max_connections=64, read_timeout_s=2.0)
            with sb.serving(srv):
                addr = srv.server_address[:2]
                before = threading.active_count()
                held = [sb.socket.create_connection(addr, timeout=30) for _ in range(300)]
                for i, s in enumerate(held):
                    s.sendall(sb.REQUEST[:-10] if i % 2 else sb.REQUEST[:40])
                time.sleep(1.0)
                assert threading.active_count() - before <= 64, threading.active_count() - before
                assert sb.exchange(addr, sb.REQUEST).startswith(b"HTTP/1.1 200")
                for s in held:
                    s.close()
        elif kind == "body-413":
            sb.test_body_over_the_per_request_cap_is_413_and_unread()
        else:
            sb.test_bodies_held_at_once_are_capped()
    return case


# --- round 2 (issue 23) -----------------------------------------------------------------------------------------
def history_torn(c: Campaign, which: str, cut: int) -> Case:
    """A nightly history whose last line a kill or a full disk cut: the next gate repairs it, passes, and every
    night is in the history once."""
    def case(w: Path) -> str | None:
        hist = w / "history"
        for night in ("n1", "n2"):
            proc = subprocess.run([PY, "-m", "evalctx.cli", *c.argv(w, run_id=night)], capture_output=True,
                                  text=True, env=ENV, timeout=300)
            assert proc.returncode == 0, proc.stderr
        gate = [PY, "-m", "evalctx.cli", "nightly-gate", "--history", str(hist), "--no-report",
                "--latency-tolerance", "1000"]
        assert subprocess.run(gate + [str(w / "n1")], capture_output=True, env=ENV).returncode == 0
        path = hist / which
        data = path.read_bytes()
        path.write_bytes(data[:max(1, len(data) - cut)])
        proc = subprocess.run(gate + [str(w / "n2")], capture_output=True, text=True, env=ENV)
        assert proc.returncode == 0, proc.stdout[-300:] + proc.stderr[-300:]
        runs = [json.loads(line) for line in (hist / "runs.jsonl").read_text().splitlines()]
        assert [r["run_id"] for r in runs][-1] == "n2" and len({r["run_id"] for r in runs}) == len(runs)
        summary = pd.read_csv(hist / "summary.csv")
        assert "n2" in set(summary["run_id"])
        return "repaired" if "dropped a torn last line" in proc.stdout else "nothing to repair"
    return case


def readers_after_kill(c: Campaign, rows: int) -> Case:
    """A retrying rerun killed after some rows: report, compare and the gate read what a resume would see."""
    def case(w: Path) -> str | None:
        sys.path.insert(0, str(REPO))
        from evalctx.analysis import runs as analysis
        from evalctx.results.journal import read_journals

        opts = ("--backend-opt", "fail_every=3", "--backend-opt", "delay_s=0.02")
        assert c.run(w, *opts).returncode == 3
        p = c.start(w, *opts)
        try:
            wait_for_rows(w / "r", N + rows, p, timeout=60)
        finally:
            p.kill()
            p.wait()
        seen = analysis.load_run(w / "r").set_index("sample_id")["status"].sort_index()
        truth = pd.Series({k: v["status"] for k, v in read_journals(w / "r").items()}).sort_index()
        assert seen.to_dict() == truth.to_dict()
    return case


def test_function(module: str, name: str) -> Case:
    """One CI test of a round-2 kind, run as a campaign case (its own loopback servers and temporary folders)."""
    def case(w: Path) -> str | None:
        import importlib
        import inspect

        fn = getattr(importlib.import_module(module), name)
        kwargs = {"tmp_path": w} if "tmp_path" in inspect.signature(fn).parameters else {}
        fn(**kwargs)
    return case


# ---------------------------------------------------------------------------------------------------------------
def plan(c: Campaign, can_mount: bool, has_mpi: bool) -> list[tuple[str, str, Case]]:
    r = c.rng
    cases: list[tuple[str, str, Case]] = []
    for _ in range(12):
        rows = r.randint(1, N - 1)
        cases.append(("kill9", f"single process after {rows} rows", kill9_single(c, rows)))
    for cut in sorted(r.sample(range(1, 1500), 10)) + [1]:
        cases.append(("torn-tail", f"last {cut} bytes cut", torn_tail(c, cut)))
    for zeros in (1, 4096):
        cases.append(("torn-tail", f"{zeros} NUL bytes after a cut line", torn_tail(c, 30, zeros=zeros)))
    for limit in (66_000, 70_000, 75_000):
        cases.append(("file-size", f"RLIMIT_FSIZE {limit}", file_size_limit(c, limit)))
    for n in (2, 2, 2, 2, 3, 3, 3, 3):
        cases.append(("concurrent", f"{n} identical commands", concurrent(c, n)))
    for sig in (signal.SIGTERM,) * 4 + (signal.SIGINT,) * 2:
        rows = r.randint(1, N - 1)
        cases.append(("signal", f"{sig.name} to a run after {rows} rows", sig_single(c, sig, rows)))
    for opt in ("mode=constant", "miss_beyond=500"):
        cases.append(("identity", f"manifest gone, other config ({opt})", lost_manifest(c, opt)))

    def text(content: str) -> Callable[[Path], None]:
        return lambda d: (d / "manifest.json").write_text(content)

    def journal_dir_file(d: Path) -> None:
        for p in (d / "journal").iterdir():
            p.unlink()
        (d / "journal").rmdir()
        (d / "journal").write_text("")

    def wrong_type(d: Path) -> None:
        j = d / "journal" / "replica-0.jsonl"
        lines = j.read_text().splitlines()
        lines[5] = lines[5].replace('"context_length": ', '"context_length": "x", "_was": ')
        j.write_text("\n".join(lines) + "\n")

    for name, spoil, needle in (("manifest invalid", text("{x"), "not valid JSON"),
                                ("manifest empty", text(""), "not valid JSON"),
                                ("manifest a list", text("[]"), "holds a JSON list"),
                                ("journal row of wrong type", wrong_type, "journal row has context_length"),
                                ("journal is a file", journal_dir_file, "not the journal folder")):
        cases.append(("bad-state", name, bad_state(c, spoil, needle)))
    s = str(c.suite)
    base = ["run", "--suite", s, "--backend", "fake", "--tokenizer", "byte", "--out", "{w}/out"]
    for argv, needle in ((base + ["--samples", "0"], "--samples"), (base + ["--batch-size", "0"], "--batch-size"),
                         (base + ["--batch-size", "-1"], "--batch-size"),
                         (base + ["--run-id", "../../escaped"], "is not a name"),
                         (base + ["--run-id", "/tmp/escaped-abs"], "is not a name"),
                         (base + ["--samples", "10000000000"], "expands to"),
                         (base + ["--lengths", "1000000000000"], "prompt needs about"),
                         (["plan", "--config", str(REPO / "evalctx/data/models/tiny"), "--context", "9", "--tp",
                           "0"], "--tp"),
                         (["serve", "--port", "70000"], "--port"),
                         (["generate", "--suite", s, "--tokenizer", "byte", "--out", "/nonexistent/x.jsonl"],
                          "No such file or directory"),
                         (base[:-1] + ["/etc/hostname"], "is a file")):
        cases.append(("bad-input", " ".join(argv[:1] + argv[-2:]), bad_input(c, argv, needle)))
    for kind in ("burst", "half-sent-300", "body-413", "body-budget"):
        cases.append(("serve", kind, serve_case(kind)))
    for which in ("summary.csv", "runs.jsonl"):
        for cut in sorted(r.sample(range(1, 400), 4)):
            cases.append(("history-torn", f"{which}: last {cut} bytes cut", history_torn(c, which, cut)))
    for rows in sorted(r.sample(range(1, 20), 3)):
        cases.append(("readers", f"retrying rerun killed after {rows} rows", readers_after_kill(c, rows)))
    for module, name in (("test_serve_bounds", "test_every_bad_request_is_a_4xx_with_an_openai_error"),
                         ("test_serve_bounds", "test_a_request_whose_client_hung_up_while_waiting_is_not_computed"),
                         ("test_http_backend", "test_answers_bounded_counts_checked_sse_read_as_specified_redirects_named"),
                         ("test_rundir", "test_a_command_line_longer_than_a_page_does_not_look_like_a_taken_lock"),
                         ("test_rundir", "test_journal_rows_that_cannot_be_right_are_not_taken"),
                         ("test_analysis", "test_readers_see_what_a_resume_would_see_after_a_killed_rerun")):
        cases.append(("round2-ci", name.removeprefix("test_"), test_function(module, name)))
    if can_mount:
        for size in ("90k", "100k", "110k", "120k", "140k", "160k"):  # all too small for the whole run
            cases.append(("full-disk", f"tmpfs {size}", full_disk(c, size)))
        if has_mpi:
            for size in ("90k", "100k", "120k", "140k"):
                for ranks in (2, 3):
                    cases.append(("full-disk", f"tmpfs {size}, {ranks} ranks", full_disk(c, size, ranks=ranks)))
    if has_mpi:
        for ranks, resume in ((2, 1), (2, 3), (3, 2), (3, 1), (2, 2), (3, 3)):
            rows = r.randint(2, 40)
            cases.append(("kill9-mpi", f"mpirun -n {ranks} after {rows} rows, resume -n {resume}",
                          kill9_mpi(c, ranks, rows, resume)))
        for sig, ranks in ((signal.SIGTERM, 2), (signal.SIGTERM, 3), (signal.SIGINT, 2), (signal.SIGINT, 3)):
            cases.append(("signal-mpirun", f"{sig.name} to mpirun -n {ranks}", sig_mpirun(c, sig, ranks)))
        for sig in (signal.SIGTERM, signal.SIGINT):
            cases.append(("signal-mpirun", f"{sig.name} to run_eval.sh -n 2", sig_run_eval(c, sig)))
        for i in range(3):
            cases.append(("stray-ranks", f"kill -9 mpirun and rank 0, resume at once ({i + 1})", stray_ranks(c)))
    return cases


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="*", default=None, help="kinds to run (default: all)")
    args = ap.parse_args()
    can_mount = os.geteuid() == 0 and subprocess.run(["mount", "--version"], capture_output=True).returncode == 0
    has_mpi = find_mpirun() is not None
    with tempfile.TemporaryDirectory(prefix="evalctx-faults-") as tmp:
        c = Campaign(Path(tmp), random.Random(args.seed))
        for kind, name, fn in plan(c, can_mount, has_mpi):
            if args.only is None or kind in args.only:
                c.case(kind, name, fn)
    by_kind: dict[str, list[bool]] = {}
    for kind, _, held, _ in c.results:
        by_kind.setdefault(kind, []).append(held)
    for kind, v in by_kind.items():
        print(f"{kind:<14} {sum(v)}/{len(v)} held")
    tried, held_n = len(c.results), sum(r[2] for r in c.results)
    print(f"tried {tried}, held {held_n}" + ("" if can_mount else " (no tmpfs: not root)")
          + ("" if has_mpi else " (no mpirun)"))
    return 0 if tried == held_n else 1


if __name__ == "__main__":
    raise SystemExit(main())
