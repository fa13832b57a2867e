"""Part of a suite (--tasks), prompts kept on request (--log-samples) and one sample shown (evalctx show)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from evalctx.cli import main
from evalctx.results.prompts import WHOLE_UP_TO, read_prompts

SUITE = str(Path(__file__).parent / "data" / "suites" / "fake_small.toml")
LONG = """
name = "long"
[[tasks]]
task = "passkey"
lengths = [300, 12000]
depths = [0.5]
samples = 1
"""


def run(tmp_path: Path, run_id: str, *extra: str, suite: str = SUITE, code: int = 0) -> pd.DataFrame:
    assert main(["run", "--suite", suite, "--backend", "fake", "--tokenizer", "byte", "--out", str(tmp_path),
                 "--run-id", run_id, "--no-progress", *extra]) == code
    return pd.read_parquet(tmp_path / run_id / "results.parquet")


def test_tasks_runs_part_of_a_suite(tmp_path: Path) -> None:
    df = run(tmp_path, "part", "--tasks", "niah_single")
    assert set(df["task"]) == {"niah_single"} and len(df) == 6
    df = run(tmp_path, "both", "--tasks", "niah_single,passkey")  # comma-separated, as other list flags take
    assert set(df["task"]) == {"niah_single", "passkey"}


def test_unknown_task_is_one_line_exit_2(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "evalctx.cli", "run", "--suite", SUITE, "--backend", "fake",
                           "--tokenizer", "byte", "--out", str(tmp_path), "--tasks", "passkey", "nope"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "evalctx: error: --tasks: nope not in suite fake_small (it has: passkey, niah_single)"]


@pytest.fixture
def long_suite(tmp_path: Path) -> str:
    path = tmp_path / "long.toml"
    path.write_text(LONG)
    return str(path)


def test_log_samples_keeps_short_prompts_whole_and_long_ones_as_excerpts(tmp_path: Path, long_suite: str) -> None:
    df = run(tmp_path, "ex", "--log-samples", suite=long_suite).set_index("context_length")
    logged = read_prompts(tmp_path / "ex")
    short, long = logged[df.loc[300, "sample_id"]], logged[df.loc[12000, "sample_id"]]
    assert len(short["pieces"]) == 1
    assert hashlib.sha1(short["pieces"][0][1].encode()).hexdigest() == df.loc[300, "prompt_sha1"]
    assert long["prompt_chars"] == 12000 - 1 > WHOLE_UP_TO  # byte tokenizer: one token per char, plus BOS
    starts = [a for a, _ in long["pieces"]]
    assert starts[0] == 0 and len(starts) == 3  # head, needle region, tail
    head, middle, tail = (t for _, t in long["pieces"])
    assert f"The pass key is {df.loc[12000, 'target'][0]}" in middle
    assert starts[2] + len(tail) == long["prompt_chars"] and tail.rstrip().endswith("The pass key is")
    assert sum(len(t) for _, t in long["pieces"]) < 4000


def test_log_samples_full_keeps_every_prompt_whole(tmp_path: Path, long_suite: str) -> None:
    df = run(tmp_path, "full", "--log-samples", "full", suite=long_suite)
    logged = read_prompts(tmp_path / "full")
    for sid, sha in zip(df["sample_id"], df["prompt_sha1"]):
        (start, text), = logged[sid]["pieces"]
        assert start == 0 and hashlib.sha1(text.encode()).hexdigest() == sha


def show(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    capsys.readouterr()
    assert main(["show", *args]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("log", [True, False])
def test_show_prints_head_needle_tail_target_and_completion(tmp_path: Path, long_suite: str, log: bool,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    df = run(tmp_path, "s", *(["--log-samples"] if log else []), suite=long_suite)
    row = df[df["context_length"] == 12000].iloc[0]
    out = show(capsys, str(tmp_path / "s"), row["sample_id"][:6])  # a unique prefix is enough
    assert f"sample {row['sample_id']} of run s" in out
    assert f"target:     {list(row['target'])!r}" in out and f"completion: {row['completion']!r}" in out
    assert "context_length 12,000 tokens, depth 50%" in out
    assert f"The pass key is {row['target'][0]}. Remember it." in out
    assert out.count("characters not shown") == 2
    assert ("prompt log" in out) == log and ("SHA-1 verified" in out) == (not log)
    whole = show(capsys, str(tmp_path / "s"), row["sample_id"], "--full")
    if not log:  # rebuilt: the whole prompt is there to print
        assert "characters not shown" not in whole and len(whole) > 12000


def test_show_refuses_a_prompt_it_cannot_rebuild_exactly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    df = run(tmp_path, "t")
    manifest = tmp_path / "t" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["tokenizer"]["fingerprint"] = "other"
    manifest.write_text(json.dumps(data))
    out = show(capsys, str(tmp_path / "t"), df["sample_id"].iloc[0])
    assert "prompt: not logged (run with --log-samples to keep it) and not rebuilt" in out
    assert "fingerprint differs" in out and "The pass key" not in out


def test_show_selects_by_cell_and_wrong_answers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    df = run(tmp_path, "w", "--backend-opt", "miss_beyond=500")  # the oracle misses every 600-token needle
    out = show(capsys, str(tmp_path / "w"), "--task", "passkey", "--wrong")
    wrong = df[(df["task"] == "passkey") & (df["score"] == 0)].sort_values(["context_length", "depth", "sample_id"])
    assert len(wrong) == 6 and (wrong["context_length"] == 600).all()
    assert out.startswith(f"sample {wrong['sample_id'].iloc[0]} of run w (the first of 6 that match task passkey, "
                          "--wrong)")
    assert "completion: ' 99999999.'" in out
    out = show(capsys, str(tmp_path / "w"), "--length", "300", "--depth", "1.0")
    assert "context_length 300 tokens, depth 100%" in out and "the first of 2" in out


@pytest.mark.parametrize("prefix, needle", [("zz", "no sample in this run matches id 'zz'"),
                                            ("", "matches 18 samples")])
def test_show_unknown_or_ambiguous_sample_is_exit_2(tmp_path: Path, prefix: str, needle: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    run(tmp_path, "u")
    capsys.readouterr()
    assert main(["show", str(tmp_path / "u"), prefix]) == 2
    assert needle in capsys.readouterr().err


def test_show_task_is_the_entry_name_and_a_task_type_is_pointed_to_its_entries(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--task niah_single on a run of named entries used to answer with three sample ids; it now lists the run's
    task names and the entries of that task."""
    suite = tmp_path / "named.toml"
    suite.write_text('name = "named"\n[[tasks]]\ntask = "niah_single"\nname = "noise_1"\nlengths = [400]\n'
                     '[[tasks]]\ntask = "passkey"\nlengths = [400]\n')
    run(tmp_path, "n", suite=str(suite))
    capsys.readouterr()
    assert main(["show", str(tmp_path / "n"), "--task", "niah_single"]) == 2
    assert capsys.readouterr().err.strip() == ("evalctx: error: --task niah_single: no such task in this run; its "
                                               "tasks (suite entry names): noise_1, passkey (niah_single is the "
                                               "task of noise_1)")
    assert "task noise_1, context_length 400" in show(capsys, str(tmp_path / "n"), "--task", "noise_1")


@pytest.mark.parametrize("pieces", [5, [[0]], [["0", "text"]], None])
def test_a_malformed_prompt_log_line_is_rebuilt_not_a_traceback(tmp_path: Path, pieces: object,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A prompt log line of another shape (edited, or written by another program) was a TypeError traceback; it
    is now left out, and show builds that prompt again, SHA-1 verified."""
    df = run(tmp_path, "m", "--log-samples")
    sid = df["sample_id"].iloc[0]
    log = tmp_path / "m" / "prompts" / "replica-0.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    log.write_text("".join(json.dumps(dict(r, pieces=pieces) if r["sample_id"] == sid else r) + "\n" for r in rows))
    assert sid not in read_prompts(tmp_path / "m") and len(read_prompts(tmp_path / "m")) == len(rows) - 1
    out = show(capsys, str(tmp_path / "m"), sid)
    assert "SHA-1 verified" in out and ("The pass key is" in out or "special magic" in out)


def test_show_prints_counts_as_integers_when_an_error_row_leaves_them_empty(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # An error row has no n_output_tokens, so pandas reads the column as float: an ok row showed "7.0".
    df = run(tmp_path, "e", "--backend-opt", "fail_every=3", code=3)
    assert df["n_output_tokens"].isna().any()
    row = df[df["status"] == "ok"].iloc[0]
    out = show(capsys, str(tmp_path / "e"), row["sample_id"])
    assert f"n_output_tokens {int(row['n_output_tokens'])}\n" in out
    assert f"needle at token {int(row['needle_token_index'])}," in out


def test_show_an_unsupported_sample_that_has_no_prompt_is_not_an_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A sample no prompt of its exact length fits is an unsupported row; show used to end on that LengthError
    (exit 2) after printing the row."""
    from evalctx.tasks import get_task
    from evalctx.models.tokenizer import ByteTokenizer

    lo = get_task("niah_single")(ByteTokenizer(), {}).min_length()
    suite = tmp_path / "unb.toml"
    suite.write_text(f'name = "unb"\n[[tasks]]\ntask = "niah_single"\nlengths = [{lo}, {lo + 1}, {lo + 2}]\n'
                     "depths = { linear = 3 }\nsamples = 40\n")
    df = run(tmp_path, "unb", suite=str(suite))
    bad = df[df["status"] == "unsupported"]
    assert len(bad)
    out = show(capsys, str(tmp_path / "unb"), bad["sample_id"].iloc[0])
    assert "status unsupported" in out and "needle at token None" in out
    assert "\nprompt: none: the run built none either" in out and "--log-samples" not in out
