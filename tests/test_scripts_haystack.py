"""Haystacks in any script: sentence ends of CJK and other scripts, line breaks kept, depths honoured or the sample
refused with the reason, and the depth as built named under the run table when it strays (issue 21, kind 4)."""

from __future__ import annotations

from pathlib import Path

import pytest

from evalctx.errors import LengthError
from evalctx.tasks import get_task
from evalctx.tasks.haystack import Haystack, essay_haystack, normalise_whitespace
from evalctx.models.tokenizer import load_tokenizer

TEXTS = {
    "chinese": "城里的老街上总有一家茶馆。它不大，门口挂着一块木牌！为什么人们愿意坐在这里呢？",
    "japanese": "駅の前に小さな本屋がある。朝早くから開いている！なぜだろう？",
    "hindi": "नदी के किनारे एक गाँव है। लोग सुबह जल्दी उठते हैं॥ क्या आपने देखा है?",
    "arabic": "في المدينة مكتبة قديمة. يزورها الناس كل يوم؟ نعم، كل يوم۔",
    "english": "The bridge is old. It still carries trains! Who looks after it?",
}


@pytest.mark.parametrize("script", sorted(TEXTS))
def test_every_sentence_end_is_a_boundary(script: str) -> None:
    text = TEXTS[script] + " "
    hay = Haystack(script, text)
    # one boundary per sentence: 0 and after each of the first sentences (the last one ends the period)
    assert len(hay.boundaries) == 3, hay.boundaries
    for b in hay.boundaries[1:]:
        assert text[b - 1] in " 。！？।॥?؟۔.!" or text[b - 2] in "。！？।॥?؟۔.!"


def test_a_latin_full_stop_without_space_is_no_sentence_end() -> None:
    hay = Haystack("x", "Pi is 3.14 or so. Next one. ")
    assert [hay.text[b:b + 4] for b in hay.boundaries] == ["Pi i", "Next"]


def test_line_breaks_are_kept_and_end_sentences() -> None:
    raw = "第一行没有标点\n\n第二行  也没有\n第三行。\n"
    assert normalise_whitespace(raw) == "第一行没有标点\n第二行 也没有\n第三行。"
    hay = Haystack("lines", normalise_whitespace(raw) + " ")
    assert [hay.text[b:b + 3] for b in hay.boundaries] == ["第一行", "第二行", "第三行"]


def test_the_shipped_english_essays_are_unchanged() -> None:
    """Keeping line breaks must not move a needle of the default essay haystack: its text (one essay per line) and
    fingerprint are what they were (RULER's single-space normalisation)."""
    hay = essay_haystack()
    assert "\n" not in hay.text and hay.fingerprint == "75487e1a14e3a598"


@pytest.mark.parametrize("task", ["niah_single", "passkey"])
@pytest.mark.parametrize("length", [2048, 4096])
def test_chinese_haystack_builds_every_depth_where_it_was_asked(task: str, length: int) -> None:
    """The issue's example: depths 0.25/0.5/0.75 were all built at 0.00 and depth 1 was unsupported."""
    t = get_task(task)(load_tokenizer("tiny"), {"haystack": "essay_zh"})
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        for seed in range(2):
            s = t.make_sample(length, depth, seed)
            assert len(s.prompt_ids) == length
            assert abs(s.depth_actual - depth) <= 0.05, (depth, s.depth_actual)  # sentences of ~90 tokens
            assert "茶馆" in s.prompt or "小镇" in s.prompt


def test_chinese_haystack_builds_at_lengths_a_character_boundary_skips() -> None:
    """A CJK character is three byte-level tokens: a window end moves by three, and whitespace before the
    question makes up the rest."""
    t = get_task("passkey")(load_tokenizer("tiny"), {"haystack": "essay_zh"})
    for length in range(1500, 1510):
        assert len(t.make_sample(length, 0.5, 0).prompt_ids) == length


def test_a_haystack_without_known_sentence_ends_is_refused_with_the_reason(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("没有任何标点的一段很长的文字" * 400)
    t = get_task("niah_single")(load_tokenizer("tiny"), {"haystack": "essay", "haystack_dir": str(tmp_path)})
    assert t.make_sample(2048, 0.0, 0).depth_actual == 0.0
    with pytest.raises(LengthError, match=r"the needle for depth 0.5 could only go at depth 0.00 .* has no sentence "
                                          r"boundary nearer"):
        t.make_sample(2048, 0.5, 0)


def test_the_run_table_names_cells_built_away_from_their_depth(tmp_path: Path) -> None:
    import pandas as pd

    from evalctx.cli import main

    (tmp_path / "s.toml").write_text('name = "zh"\n[[tasks]]\ntask = "passkey"\nlengths = [1024, 2048]\n'
                                     'depths = [0.0, 0.5]\nsamples = 1\n[tasks.options]\nhaystack = "essay_zh"\n')
    assert main(["run", "--suite", str(tmp_path / "s.toml"), "--backend", "fake", "--out", str(tmp_path),
                 "--run-id", "zh", "--no-progress"]) == 0
    df = pd.read_parquet(tmp_path / "zh" / "results.parquet")
    assert (df["status"] == "ok").all() and (df["score"] == 1).all()
    from evalctx.analysis.table import depth_lines

    off = df.assign(depth_actual=df["depth"] + 0.08 * (df["depth"] > 0))
    line = " ".join(depth_lines(off))
    assert "in 2 cells" in line and "1024 @ 50%: 58-58%" in line
    assert depth_lines(df) == []
    summary = pd.read_csv(tmp_path / "zh" / "summary.csv")
    assert "depth_actual_mean" in summary.columns
