"""Bad input and bad state: one line on stderr, exit 2, no traceback, nothing run; nonsense values refused before
any work (they used to be ignored, or to run for minutes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
from fault_util import tmpfs

from evalctx.cli import main

SUITE = str(Path(__file__).parent / "data" / "suites" / "fake_small.toml")
RUN = ["run", "--suite", SUITE, "--backend", "fake", "--tokenizer", "byte", "--no-progress"]
TINY = str(Path(__file__).parent.parent / "evalctx" / "data" / "models" / "tiny")


def one_line_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code  # type: ignore[assignment]
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def suite_file(tmp_path: Path, body: str) -> str:
    p = tmp_path / "s.toml"
    p.write_text(body)
    return str(p)


@pytest.mark.parametrize("argv, needle", [
    (RUN + ["--samples", "0"], "--samples: must be a positive integer, not 0"),
    (RUN + ["--batch-size", "0"], "--batch-size: must be a positive integer"),
    (RUN + ["--batch-size", "-3"], "--batch-size: must be a positive integer"),
    (RUN + ["--lengths", "0"], "--lengths: must be a positive integer"),
    (RUN + ["--samples", "many"], "'many' is not an integer"),
    (RUN + ["--run-id", "../../x"], "is not a name"),
    (RUN + ["--samples", "100000000000"], "expands to 900,000,000,000 samples"),
    (RUN + ["--lengths", "100000000000000"], "prompt needs about"),
    (["plan", "--config", TINY, "--context", "1024", "--tp", "0"], "--tp: must be a positive integer"),
    (["plan", "--config", TINY, "--context", "0"], "--context: must be a positive integer"),
    (["plan", "--config", TINY, "--context", "1024", "--kv-fraction", "1.5"], "at most 1"),
    (["plan", "--config", TINY, "--context", "1024", "--gpu-memory", "nan"], "not a finite number"),
    (["serve", "--port", "70000"], "--port: must be a TCP port"),
    (["serve", "--port", "-1"], "--port: must be a TCP port"),
    (["serve", "--max-connections", "0"], "--max-connections: must be a positive integer"),
    (["serve", "--backend", "fake", "--max-body-mb", "10", "--max-buffered-mb", "5"], "one largest request"),
    (["generate", "--suite", SUITE, "--tokenizer", "byte", "--out", "/nonexistent-dir/x.jsonl"],
     "--out /nonexistent-dir/x.jsonl: No such file or directory"),
])
def test_bad_values_are_refused_before_work(argv: list[str], needle: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert needle in one_line_exit_2(argv, capsys)


@pytest.mark.parametrize("body, needle", [
    ('name = "../../../x"\n[[tasks]]\ntask = "passkey"\nlengths = [300]\n', "is not a name"),
    ('[[tasks]]\ntask = "passkey"\nlengths = [300]\nsamples = 100000000000\n', "expands to 100,000,000,000"),
    ('[[tasks]]\ntask = "passkey"\nlengths = [300]\ndepths = { linear = 100000000 }\n', "100,000,000 depths"),
    ('[[tasks]]\ntask = "passkey"\nlengths = [300]\ndepths = { sigmoid = 5000 }\n', "5,000 depths"),
])
def test_suites_too_large_or_named_like_paths(tmp_path: Path, body: str, needle: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert needle in one_line_exit_2(["run", "--suite", suite_file(tmp_path, body), "--backend", "fake",
                                      "--tokenizer", "byte", "--out", str(tmp_path)], capsys)


def test_non_utf8_suite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "latin1.toml"
    p.write_bytes('description = "café"\n'.encode("latin-1"))
    assert "not UTF-8 text" in one_line_exit_2(["run", "--suite", str(p), "--backend", "fake"], capsys)


@pytest.mark.parametrize("script, needle", [
    ("not json\n", ":1: a script line must be a JSON object"),
    ('{"sample_id": "x"}\n', ":1: a script line must be"),
    ('{"text": " 1."}\n[1, 2]\n', ":2: a script line must be"),
])
def test_malformed_fake_scripts(tmp_path: Path, script: str, needle: str,
                                capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "script.jsonl"
    p.write_text(script)
    assert needle in one_line_exit_2(RUN + ["--out", str(tmp_path), "--backend-opt", "mode=scripted",
                                            "--backend-opt", f"script={p}"], capsys)


def _manifest(text: str) -> Callable[[Path], None]:
    return lambda run_dir: (run_dir / "manifest.json").write_text(text)


def _journal_row(run_dir: Path) -> None:
    p = run_dir / "journal" / "replica-0.jsonl"
    lines = p.read_text().splitlines()
    row = json.loads(lines[2])
    row["depth"] = "half"
    p.write_text("\n".join([*lines[:2], json.dumps(row), *lines[3:]]) + "\n")


def _journal_is_a_file(run_dir: Path) -> None:
    for p in (run_dir / "journal").iterdir():
        p.unlink()
    (run_dir / "journal").rmdir()
    (run_dir / "journal").write_text("")


@pytest.mark.parametrize("spoil, needle", [
    (_manifest("{not json"), "manifest.json: not valid JSON"),
    (_manifest(""), "manifest.json: not valid JSON"),
    (_manifest("[1, 2, 3]"), "manifest.json: holds a JSON list"),
    (_journal_row, "replica-0.jsonl:3: journal row has depth='half'"),
    (_journal_is_a_file, "journal is a file, not the journal folder"),
])
def test_bad_run_dir_state(tmp_path: Path, spoil: Callable[[Path], None], needle: str,
                           capsys: pytest.CaptureFixture[str]) -> None:
    argv = RUN + ["--out", str(tmp_path), "--run-id", "r"]
    assert main(argv) == 0
    capsys.readouterr()
    spoil(tmp_path / "r")
    before = sorted((p.name, p.stat().st_size) for p in (tmp_path / "r").rglob("*") if p.is_file())
    assert needle in one_line_exit_2(argv, capsys)
    after = sorted((p.name, p.stat().st_size) for p in (tmp_path / "r").rglob("*") if p.is_file())
    assert after == before  # nothing lost, nothing touched


def test_out_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    assert "--out" in one_line_exit_2(RUN + ["--out", str(f)], capsys) and f.read_text() == "x"


def test_read_only_file_system(tmp_path: Path) -> None:
    """A real read-only mount where this machine allows one (root); a subprocess, as a user would meet it."""
    mnt = tmp_path / "ro"
    with tmpfs(mnt, "size=1m,ro") as mounted:
        if not mounted:
            pytest.skip("cannot mount a tmpfs here")
        proc = subprocess.run([sys.executable, "-m", "evalctx.cli", *RUN, "--out", str(mnt / "out")],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "Read-only file system" in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_depths_override_and_min_accuracy(tmp_path, capsys) -> None:
    """Issue 26, kinds 5 and 7: a needle-first sample on the command line, and eval_long_context.py's accuracy
    assert as an exit code."""
    import pandas as pd

    from evalctx.cli import main

    base = ["run", "--backend", "fake", "--tasks", "passkey", "--lengths", "1200", "--samples", "2", "--out",
            str(tmp_path), "--no-progress", "--depths", "0"]
    assert main(base + ["--run-id", "a", "--min-accuracy", "99"]) == 0
    df = pd.read_parquet(tmp_path / "a" / "results.parquet")
    assert set(df["depth"]) == {0.0} and len(df) == 2
    assert main(base + ["--run-id", "b", "--min-accuracy", "99", "--backend-opt", "miss_beyond=500"]) == 4
    assert "below --min-accuracy 99%" in capsys.readouterr().err
    assert main(base + ["--run-id", "c", "--depths", "50"]) == 2
    assert main(base + ["--run-id", "d", "--min-accuracy", "120"]) == 2
