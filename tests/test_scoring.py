"""Scorers against their upstream definitions (anchors 3.1-3.3), written out here as small reference functions."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evalctx.errors import UsageError
from evalctx.tasks.scoring import (SCORERS, first_int_match, get_scorer, landmark_int_match, ruler_postprocess, score,
                             string_match_all, string_match_part)


def ref_first_int_match(pred: str, label: str) -> int:
    """InfiniteBench / TensorRT-LLM ``compute_scores.first_int_match``."""
    pred_value = ""
    for item in re.split("[^0-9]", pred):
        if item != "":
            pred_value = item
            break
    return int(pred_value == label)


def ref_postprocess(pred: str) -> str:
    """RULER ``postprocess_pred``."""
    pred = pred.strip()
    return re.compile(r"[\x00-\x1f]").sub("\n", pred).strip()


def ref_string_match_all(pred: str, refs: list[str]) -> float:
    """RULER ``string_match_all`` for one sample (before the x100)."""
    pred = ref_postprocess(pred)
    return sum(1.0 if r.lower() in pred.lower() else 0.0 for r in refs) / len(refs)


def ref_string_match_part(pred: str, refs: list[str]) -> float:
    """RULER ``string_match_part`` for one sample: max over references."""
    pred = ref_postprocess(pred)
    return max(1.0 if r.lower() in pred.lower() else 0.0 for r in refs)


@pytest.mark.parametrize("pred,label,want", [
    (" 12345.", "12345", 1.0),
    ("12345", "12345", 1.0),
    (" 01234. Remember it.", "01234", 1.0),  # the leading zero is part of the key
    ("1234", "01234", 0.0),  # compared as strings, not numbers
    ("The pass key is 12345", "12345", 1.0),
    ("12345 or 54321", "54321", 0.0),  # only the first integer counts
    ("-12345", "12345", 1.0),
    ("12,345", "12345", 0.0),
    ("no number here", "12345", 0.0),
    ("", "12345", 0.0),
    ("１２３４５", "12345", 0.0),  # full-width digits are not [0-9]
])
def test_first_int_match(pred, label, want):
    got = first_int_match(pred, [label])
    assert got.value == want == ref_first_int_match(pred, label)
    assert 0.0 <= got.value <= 1.0 and (got.why == "") == (want == 1.0)


def test_first_int_match_extracted():
    assert first_int_match(" 01234.", ["01234"]).extracted == "01234"
    assert first_int_match("none", ["1"]).extracted is None


@pytest.mark.parametrize("pred,refs,want", [
    ("The numbers are 1234567 and 7654321.", ["1234567", "7654321"], 1.0),
    ("The number is 1234567.", ["1234567", "7654321"], 0.5),  # partial credit
    ("nothing", ["1234567", "7654321", "1111111"], 0.0),
    ("Answer: ABC-DEF", ["abc-def"], 1.0),  # case-insensitive
    ("answer: abc-def", ["ABC-Def"], 1.0),
    ("123\x004567", ["1234567"], 0.0),  # a control character becomes a newline, splitting the number
    ("\t\n 1234567 \x1f", ["1234567"], 1.0),
    ("12345678", ["1234567"], 1.0),  # substring match, as upstream
])
def test_string_match_all(pred, refs, want):
    got = string_match_all(pred, refs)
    assert got.value == pytest.approx(want) and got.value == pytest.approx(ref_string_match_all(pred, refs))


@pytest.mark.parametrize("pred,refs,want", [
    ("Paris is the capital.", ["paris", "Paris, France"], 1.0),  # any reference: full credit (RULER, not lm-eval)
    ("London", ["paris", "Paris, France"], 0.0),
    ("PARIS", ["paris"], 1.0),
    ("Pa\x01ris", ["paris"], 0.0),
])
def test_string_match_part(pred, refs, want):
    got = string_match_part(pred, refs)
    assert got.value == want == ref_string_match_part(pred, refs)


@pytest.mark.parametrize("pred,label,want", [
    (" 123.", "123", 1.0),
    ("The pass key is 0123", "123", 1.0),  # int() comparison, unlike first_int_match
    ("42 then 123", "123", 0.0),
    ("no digits", "123", 0.0),  # upstream would raise on .group() of None; here it is simply wrong
])
def test_landmark_int_match(pred, label, want):
    assert landmark_int_match(pred, [label]).value == want


def test_postprocess_and_registry():
    assert ruler_postprocess("  abc\x01def\x1f ") == "abc\ndef"
    assert set(SCORERS) == {"first_int_match", "string_match_all", "string_match_part", "landmark_int_match",
                            "kv_retrieval_match"}
    assert score("first_int_match", " 7", ["7"]).value == 1.0
    assert get_scorer("string_match_all") is string_match_all
    with pytest.raises(UsageError, match="unknown scorer"):
        get_scorer("exact")


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.characters(max_codepoint=0x7f), max_size=40),
       st.lists(st.text(alphabet="abcXYZ0129-", min_size=1, max_size=6), min_size=1, max_size=4))
def test_scorers_match_references_on_random_text(pred, refs):
    assert string_match_all(pred, refs).value == pytest.approx(ref_string_match_all(pred, refs))
    assert string_match_part(pred, refs).value == ref_string_match_part(pred, refs)
    assert first_int_match(pred, refs[:1]).value == ref_first_int_match(pred, refs[0])


@pytest.mark.parametrize("name,pred,bare", [
    ("string_match_all", " 0123456789.", "7503775"),  # the example: every character is in the output
    ("first_int_match", " 1.", "12345"),  # "1" == the first character of "12345"
    ("string_match_part", " 7.", "7503775"),
    ("landmark_int_match", " 1.", "12345"),
    ("kv_retrieval_match", " a b", "ab"),
])
def test_a_bare_string_is_refused(name, pred, bare):
    with pytest.raises(TypeError, match="bare string"):
        score(name, pred, bare)
    assert score(name, pred, [bare]).value == 0.0  # the same reference as a list: the answer is wrong


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_every_scorer_refuses_bytes_and_no_reference(name):
    """Every scorer takes its references through one check: bytes (iterated: ints) and [] are refused by all."""
    with pytest.raises(TypeError, match="bare string"):
        score(name, " 97", b"a")
    with pytest.raises(ValueError, match="no reference"):
        score(name, " 97", [])


def test_references_from_any_list_like():
    import numpy as np

    assert score("string_match_all", "7503775 and 1234567", np.array(["7503775", "1234567"], dtype=object)).value == 1
    assert score("first_int_match", " 12345.", ("12345",)).value == 1
    with pytest.raises(ValueError, match="no reference"):
        score("string_match_all", "x", [])
    with pytest.raises(TypeError, match="must be strings"):
        score("first_int_match", "12345", [12345])
