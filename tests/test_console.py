"""What a run prints on the console: the progress line (tqdm), the table's legend and latency format, and the run
dir named when the run starts."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest

from evalctx.cli import main
from evalctx.run.progress import Progress
from evalctx.analysis.table import format_summary

SUITE = str(Path(__file__).parent / "data" / "suites" / "fake_small.toml")


def test_final_progress_line_prints_once_when_the_last_update_drew_it() -> None:
    out = io.StringIO()  # not a terminal: one line per refresh
    p = Progress(4, 4000, stream=out, interval_s=0.0)
    for _ in range(4):
        p.update(1, 1000)
    p.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    finals = [ln for ln in lines if "4/4 samples" in ln]
    assert len(finals) == 1, lines
    assert "4.00k/4.00k tokens" in finals[0]


def test_final_progress_line_prints_once_when_close_draws_it() -> None:
    out = io.StringIO()
    p = Progress(3, 300, stream=out, interval_s=3600.0)  # no refresh between the first line and close()
    for _ in range(3):
        p.update(1, 100, errors=1)
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines  # the start line and the final one
    assert "0/3 samples" in lines[0] and "3/3 samples, 3 errors" in lines[1]


def test_a_run_stopped_before_its_first_sample_prints_its_progress_line_once() -> None:
    out = io.StringIO()  # e.g. the http backend's first prompt-length check stops the run
    p = Progress(20, 15_400, stream=out, interval_s=10.0)
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and "0/20 samples" in lines[0], lines


def test_a_terminal_without_a_size_gets_progress_lines_not_an_empty_bar() -> None:
    import os
    import pty

    master, slave = pty.openpty()  # a pty opened without a size: 0 columns, as under `script` with no terminal
    try:
        assert os.get_terminal_size(slave).columns == 0
        with os.fdopen(slave, "w", closefd=False) as stream:
            p = Progress(2, 200, stream=stream, interval_s=3600.0)
            p.update(2, 200)
            p.close()
        text = os.read(master, 65536).decode()
    finally:
        os.close(slave)
        os.close(master)
    assert "2/2 samples" in text and "200/200 tokens" in text, repr(text)


def test_disabled_progress_draws_nothing() -> None:
    out = io.StringIO()
    for p in (Progress(3, 300, stream=out, enabled=False), Progress(0, 0, stream=out)):
        p.update(1, 100)
        p.close()
    assert out.getvalue() == ""


def _rows(latencies: list[float]) -> pd.DataFrame:
    return pd.DataFrame({
        "task": "passkey", "context_length": [1024 * (i + 1) for i in range(len(latencies))], "depth": 0.5,
        "status": "ok", "score": 1.0, "latency_s": latencies, "ttft_s": latencies, "completion": " 1.",
    })


def test_table_latencies_share_one_format_and_abbreviations_are_explained() -> None:
    text = format_summary(_rows([0.0403, 0.03, 13.0, 0.00012]))
    rows = [ln for ln in text.splitlines() if ln.lstrip()[:1].isdigit()]
    assert [r.split()[-1] for r in rows] == ["0.040", "0.030", "13.000", "0.000"]
    for word in ("err:", "uns:", "n:", "95% CI:", "p50 s:"):
        assert word in text
    assert max(len(ln) for ln in text.splitlines()) <= 100


def test_run_dir_is_named_when_the_run_starts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--suite", SUITE, "--backend", "fake", "--tokenizer", "byte", "--out", str(tmp_path),
                 "--run-id", "r"]) == 0
    err = capsys.readouterr().err
    first = err.splitlines()[0]
    assert first == f"evalctx: run r -> {tmp_path / 'r'}: 18 of 18 samples to run"
    assert err.count("18/18 samples") == 1


def test_generate_says_its_size_up_front_and_shows_progress(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    import re

    out = tmp_path / "s.jsonl"
    assert main(["generate", "--suite", SUITE, "--tokenizer", "byte", "--out", str(out)]) == 0
    err = capsys.readouterr().err.splitlines()
    m = re.fullmatch(r"evalctx: generating 18 samples, ([\d,]+) prompt tokens, about ([\d.]+) kB -> (.+)", err[0])
    assert m, err
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert int(m.group(1).replace(",", "")) == sum(r["context_length"] for r in rows)
    assert m.group(3) == str(out)
    # The estimate (said before any prompt but the shortest is built) is within 5% of what was written.
    assert float(m.group(2)) == pytest.approx(out.stat().st_size / 1e3, rel=0.05)
    assert sum("18/18 samples" in x for x in err) == 1
    assert err[-1] == f"evalctx: wrote 18 samples ({out.stat().st_size / 1e3:.1f} kB) to {out}"


def test_generate_estimates_each_entry_by_its_own_bytes_per_token(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Noise and essay haystacks differ in bytes per token: the ruler suite's estimate, scaled from its first
    entry's (noise) sample alone, said 6.2 MB for 4.8 MB written."""
    import re

    out = tmp_path / "r.jsonl"
    assert main(["generate", "--suite", "ruler", "--tokenizer", "tiny", "--lengths", "4096", "--samples", "1",
                 "--out", str(out), "--no-progress"]) == 0
    m = re.search(r"about ([\d.]+) (kB|MB)", capsys.readouterr().err)
    assert m
    said = float(m.group(1)) * (1e3 if m.group(2) == "kB" else 1e6)
    assert said == pytest.approx(out.stat().st_size, rel=0.05)


def test_the_table_says_which_scores_carry_a_flag() -> None:
    """A 0% row under short_budget, or a score beyond a RoPE model's stated window, must not print bare: the table
    names the flag, how many scored samples and at which lengths (error rows' flags are not counted)."""
    df = _rows([0.1, 0.1, 0.1]).assign(score=0.0, flags=[["short_budget"], [], ["short_budget",
                                                                                 "beyond_trained_window"]])
    df.loc[len(df)] = {**df.iloc[0].to_dict(), "status": "error", "score": None, "flags": ["short_budget"]}
    text = format_summary(df)
    assert "flagged short_budget: 2 scored samples at length 1024, 3072: max_new_tokens is below" in text
    assert "flagged beyond_trained_window: 1 scored samples at length 3072" in text
    assert "flagged" not in format_summary(_rows([0.1]).assign(flags=[[]]))
    assert "flagged" not in format_summary(_rows([0.1]))  # results without a flags column
