"""Scorers, each matching its upstream definition (cited), on one prediction at a time.

Per-sample values are in 0..1; a run's accuracy is their mean, which is how RULER and InfiniteBench aggregate too
(RULER multiplies by 100 afterwards).

References are always a list of strings (``Sample.target``, the ``target`` list column of results.parquet). A bare
string is refused with TypeError: iterated, ``"7503775"`` would be seven one-character references, and any output
holding a digit would score.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Sequence

from evalctx.errors import UsageError
from evalctx.records import Score

_CONTROL = re.compile(r"[\x00-\x1f]")


def ruler_postprocess(pred: str) -> str:
    """RULER ``postprocess_pred``: control characters become newlines, then strip."""
    return _CONTROL.sub("\n", pred).strip()


def references(refs: Iterable[str]) -> list[str]:
    """``refs`` as a list of strings; any iterable of strings (a list, a tuple, a parquet list cell) is taken.

    Raises TypeError for a bare string or bytes, or an item that is not a string, and ValueError for no reference.
    """
    if isinstance(refs, (str, bytes)):
        raise TypeError(f"references must be a list of strings, not the bare string {refs!r} "
                        "(a string would be read as a list of characters)")
    out = list(refs)
    bad = [r for r in out if not isinstance(r, str)]
    if bad:
        raise TypeError(f"references must be strings, got {bad[0]!r}")
    if not out:
        raise ValueError("no reference answers to score against")
    return out


def first_int_match(pred: str, refs: Sequence[str]) -> Score:
    """InfiniteBench/TensorRT-LLM ``compute_scores.first_int_match``: the first run of digits equals the label.

    ``re.split("[^0-9]", pred)`` and take the first non-empty piece; the label is compared as a string, so a
    leading zero in a 5-digit key matters.
    """
    refs = references(refs)
    pieces = [p for p in re.split("[^0-9]", pred) if p]
    got = pieces[0] if pieces else None
    ok = got is not None and got == str(refs[0])
    return Score(1.0 if ok else 0.0, got, "" if ok else f"first integer {got!r} != {refs[0]!r}")


def string_match_all(pred: str, refs: Sequence[str]) -> Score:
    """RULER ``string_match_all``: the fraction of references found (case-insensitive substring) in the output."""
    refs = references(refs)
    text = ruler_postprocess(pred).lower()
    found = [r for r in refs if r.lower() in text]
    value = len(found) / len(refs)
    missing = [r for r in refs if r.lower() not in text]
    return Score(value, ",".join(found) if found else None, "" if not missing else f"missing {missing}")


def string_match_part(pred: str, refs: Sequence[str]) -> Score:
    """RULER ``string_match_part``: 1 if any reference is found (case-insensitive substring), else 0.

    (lm-evaluation-harness gives fractional credit here instead; RULER #15 confirms "any" is the intent.)
    """
    refs = references(refs)
    text = ruler_postprocess(pred).lower()
    found = [r for r in refs if r.lower() in text]
    return Score(1.0 if found else 0.0, found[0] if found else None, "" if found else "no reference found")


def landmark_int_match(pred: str, refs: Sequence[str]) -> Score:
    """Landmark attention ``run_test.py``: ``int(re.search(r'\\d+', response).group()) == pass_key``."""
    refs = references(refs)
    m = re.search(r"\d+", pred)
    got = m.group() if m else None
    ok = got is not None and int(got) == int(refs[0])
    return Score(1.0 if ok else 0.0, got, "" if ok else f"first integer {got!r} != {refs[0]!r}")


_KV_STRIP = str.maketrans({c: " " for c in "\n:\"'.,?!{}"})


def kv_retrieval_match(pred: str, refs: Sequence[str]) -> Score:
    """InfiniteBench/TensorRT-LLM ``compute_scores.get_score_one_kv_retrieval``: replace each of ``\\n : " ' . , ?
    ! { }`` with a space, split on whitespace; 1 if the label is one of the words (case-sensitive, whole words).
    """
    label = references(refs)[0]
    words = pred.translate(_KV_STRIP).split()
    if label in words:
        return Score(1.0, label, "")
    return Score(0.0, words[0] if words else None, f"{label!r} is not a word of the output")


SCORERS: dict[str, Callable[[str, Sequence[str]], Score]] = {
    "first_int_match": first_int_match,
    "string_match_all": string_match_all,
    "string_match_part": string_match_part,
    "landmark_int_match": landmark_int_match,
    "kv_retrieval_match": kv_retrieval_match,
}


def get_scorer(name: str) -> Callable[[str, Sequence[str]], Score]:
    if name not in SCORERS:
        raise UsageError(f"unknown scorer {name!r}: choose one of {', '.join(SCORERS)}")
    return SCORERS[name]


def score(name: str, pred: str, refs: Sequence[str]) -> Score:
    return get_scorer(name)(pred, refs)
