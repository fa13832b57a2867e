"""kv_retrieval: the upstream prompt and scorer (InfiniteBench / TensorRT-LLM), exact lengths with whole JSON pairs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizer_fixtures import CHAT_TOKENIZER_NAMES, HAVE_HF, TOKENIZER_NAMES, get_tokenizer

from evalctx.errors import LengthError, UsageError
from evalctx.records import Sample
from evalctx.tasks.scoring import get_scorer, kv_retrieval_match
from evalctx.tasks import get_task
from evalctx.tasks.base import Task
from evalctx.models.tokenizer import ByteTokenizer

needs_hf = pytest.mark.skipif(not HAVE_HF, reason="needs tokenizers and transformers")
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"

# TensorRT-LLM examples/infinitebench/eval_utils.create_prompt, templates["kv_retrieval"].
UPSTREAM_TEMPLATE = ("Extract the value corresponding to the specified key in the JSON object below.\n\n{context}\n\n"
                     "{input}")


def upstream_context(pairs: list[tuple[str, str]]) -> str:
    """construct_synthetic_dataset.build_kv_retrieval: the context it writes for these records, in this order."""
    text = "JSON data:\n{"
    for k, v in pairs:
        text += "\"" + k + "\": \"" + v + "\", "
    return text[:-2] + "}"


def upstream_input(key: str) -> str:
    return "\nKey: \"" + key + "\"\nThe value associated with the specified key is: "


def ref_kv_score(pred: str, label: str) -> bool:
    """InfiniteBench src/compute_scores.py get_score_one_kv_retrieval, as written there."""
    for c in ['\n', ':', '\"', '\'', '.', ',', '?', '!', '{', '}']:
        pred = pred.replace(c, ' ')
    words = pred.split()
    return label in words


def json_object(s: Sample) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """The object in the prompt, parsed by json (so its structure is intact), and its pairs in order."""
    start = s.prompt.index("JSON data:\n") + len("JSON data:\n")
    end = s.prompt.index("}", start) + 1
    obj = json.loads(s.prompt[start:end])
    return obj, re.findall(rf'"({UUID})": "({UUID})"', s.prompt[start:end])


def check_kv_sample(task: Task, s: Sample, length: int, depth: float) -> None:
    tok = task.tokenizer
    assert len(s.prompt_ids) == s.context_length == length
    # the Sample contract: its ids are the prompt's with special tokens only in the chat template's spans
    assert tok.encode(s.prompt, s.add_special_tokens, s.special_spans) == s.prompt_ids
    assert bool(s.special_spans) == (s.prompt_mode == "chat")
    obj, pairs = json_object(s)
    key, value = s.meta["key"], s.target[0]
    assert len(obj) == len(pairs) == s.meta["n_pairs"]  # whole pairs only, every key distinct
    assert obj[key] == value and re.fullmatch(UUID, key) and re.fullmatch(UUID, value)
    assert len({v for _, v in pairs}) == len(pairs)
    assert s.prompt.count(value) == 1  # the answer exactly once
    assert s.prompt.count(key) == 2  # in the object and in the question
    index = [k for k, _ in pairs].index(key)
    assert index == round(depth * (len(pairs) - 1))  # depth = the asked pair's place among the pairs
    # needle_token_index points at the asked pair
    _, offsets = tok.encode_with_offsets(s.prompt, s.add_special_tokens, s.special_spans)
    at = s.prompt.index(f'"{key}": "{value}"')
    i = s.needle_token_index
    assert offsets[i][0] <= at < max(offsets[i][1], offsets[i][0] + 1)
    if s.depth_actual is not None:
        assert 0.0 <= s.depth_actual <= 1.0
    # the row keeps its answer's length (short_budget needs it) and the default budget holds it
    assert 0 < s.meta["answer_tokens"] and task.answer_tokens() <= task.default_budget()
    scorer = get_scorer(s.scorer)
    assert scorer(f" {value}.", s.target).value == 1.0
    others = [v for k, v in pairs if k != key]
    if others:  # another pair's value is wrong
        assert scorer(f" {others[0]}.", s.target).value == 0.0


@st.composite
def kv_cases(draw):
    tok = draw(st.sampled_from(TOKENIZER_NAMES))
    mode = draw(st.sampled_from(["raw", "chat"])) if tok in CHAT_TOKENIZER_NAMES else "raw"
    depth = draw(st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(0, 1)))
    return tok, mode, depth, draw(st.integers(0, 2**31)), draw(st.integers(4, 3000))


def _kv_case(case):
    tok_name, mode, depth, seed, extra = case
    task = get_task("kv_retrieval")(get_tokenizer(tok_name), {}, mode)
    length = task.min_length() + extra
    s = task.make_sample(length, depth, seed)
    check_kv_sample(task, s, length, depth)
    again = get_task("kv_retrieval")(get_tokenizer(tok_name), {}, mode).make_sample(length, depth, seed)
    assert again == s


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kv_cases())
def test_kv_samples_hold_every_guarantee(case):
    _kv_case(case)


@pytest.mark.slow
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kv_cases())
def test_kv_samples_hold_every_guarantee_thoroughly(case):
    _kv_case(case)


@pytest.mark.parametrize("tok_name", TOKENIZER_NAMES)
def test_every_length_builds(tok_name):
    """Every length from min_length() on, at depths 0, 0.5 and 1: consecutive ones right above it and at 2K."""
    task = get_task("kv_retrieval")(get_tokenizer(tok_name), {})
    lo = task.min_length()
    for length in [*range(lo, lo + 25), *range(2000, 2025)]:
        for depth in (0.0, 0.5, 1.0):
            assert len(task.make_sample(length, depth, length).prompt_ids) == length


@needs_hf
def test_prompt_is_upstream_with_a_real_tokenizer():
    """With a BPE tokenizer the pairs' token counts differ, so swaps close the gap: no padding, the prompt is
    exactly TensorRT-LLM's create_prompt over construct_synthetic_dataset's context."""
    task = get_task("kv_retrieval")(get_tokenizer("bpe_llama3"), {})
    padded = 0
    for length in range(3000, 3020):
        s = task.make_sample(length, 0.5, 1)
        if s.meta["pad_spaces"]:
            padded += 1
            continue
        _, pairs = json_object(s)
        expected = UPSTREAM_TEMPLATE.format(context=upstream_context(pairs), input=upstream_input(s.meta["key"]))
        assert s.prompt == expected
    assert padded <= 1
    assert (s.scorer, s.max_new_tokens) == ("kv_retrieval_match", 50)


def test_byte_tokenizer_pads_with_json_whitespace():
    """Every pair is 80 bytes, so the last tokens are spaces before the closing brace; the JSON stays valid and
    the text is upstream's apart from them."""
    task = get_task("kv_retrieval")(ByteTokenizer(), {})
    s = task.make_sample(900, 1.0, 3)
    pad = s.meta["pad_spaces"]
    assert 0 < pad < 80 and " " * pad + "}" in s.prompt
    _, pairs = json_object(s)
    assert pairs[-1][0] == s.meta["key"]  # depth 1: the last pair
    unpadded = s.prompt.replace(" " * pad + "}", "}")
    assert unpadded == UPSTREAM_TEMPLATE.format(context=upstream_context(pairs), input=upstream_input(s.meta["key"]))
    assert s.prompt_ids[0] == ByteTokenizer.BOS
    # a length that whole pairs reach exactly needs no padding
    t = task.make_sample(900 - pad, 1.0, 3)
    assert t.meta["pad_spaces"] == 0


def test_chat_mode_puts_the_answer_prefix_in_the_assistant_turn():
    task = get_task("kv_retrieval")(ByteTokenizer(chat=True), {}, "chat")
    s = task.make_sample(1200, 0.5, 2)
    assert s.prompt.endswith("The value associated with the specified key is: ")
    assert s.messages is not None and s.messages[1] == {
        "role": "assistant", "content": "The value associated with the specified key is: "}
    assert s.messages[0]["content"].startswith("Extract the value corresponding")
    assert s.messages[0]["content"].endswith(f'\n\n\nKey: "{s.meta["key"]}"')
    assert f'"{s.meta["key"]}": "{s.target[0]}"' in s.messages[0]["content"]


def test_too_short_and_bad_arguments():
    task = get_task("kv_retrieval")(ByteTokenizer(), {})
    lo = task.min_length()
    with pytest.raises(LengthError, match=f"too short.*{lo} tokens"):
        task.make_sample(lo - 1, 0.5, 0)
    with pytest.raises(UsageError, match="not percent"):
        task.make_sample(2000, 50, 0)
    with pytest.raises(UsageError, match="unknown option"):
        get_task("kv_retrieval")(ByteTokenizer(), {"pairs": 10})


def test_sample_id_is_stable_and_depends_on_the_cell():
    task = get_task("kv_retrieval")(ByteTokenizer(), {})
    a = task.make_sample(1500, 0.5, 3)
    assert re.fullmatch(r"[0-9a-f]{16}", a.id) and a.id == task.sample_id(1500, 0.5, 3)
    assert len({a.id, task.make_sample(1501, 0.5, 3).id, task.make_sample(1500, 0.25, 3).id,
                task.make_sample(1500, 0.5, 4).id}) == 4


@pytest.mark.parametrize("pred,label,want", [
    (" 1b2c-3d4e.", "1b2c-3d4e", 1.0),
    ('"1b2c-3d4e"}', "1b2c-3d4e", 1.0),
    ("The value associated with the specified key is: 1b2c-3d4e", "1b2c-3d4e", 1.0),
    (" 1B2C-3D4E", "1b2c-3d4e", 0.0),  # case-sensitive, as upstream
    (" 1b2c-3d4e5", "1b2c-3d4e", 0.0),  # a whole word, not a substring
    ("", "1b2c-3d4e", 0.0),
])
def test_kv_retrieval_match_examples(pred, label, want):
    assert kv_retrieval_match(pred, [label]).value == want


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab12-\n:\"'.,?!{} X")), max_size=30),
       st.text(alphabet="ab12-", min_size=1, max_size=5))
def test_kv_retrieval_match_is_upstream(pred, label):
    assert kv_retrieval_match(pred, [label]).value == float(ref_kv_score(pred, label))


def test_kv_retrieval_match_refuses_a_bare_string():
    with pytest.raises(TypeError, match="list"):
        kv_retrieval_match("abc", "abc")


def test_the_fake_oracle_answers_kv_retrieval_and_the_suite_runs(tmp_path, capsys):
    from evalctx.backends.fake import oracle_answer
    from evalctx.cli import main

    s = get_task("kv_retrieval")(ByteTokenizer(), {}).make_sample(1500, 0.3, 1)
    assert kv_retrieval_match(oracle_answer(s.prompt), s.target).value == 1.0
    root = Path(__file__).resolve().parent.parent
    assert main(["run", "--suite", str(root / "tasks" / "kv_retrieval.toml"), "--backend", "fake", "--tokenizer",
                 "byte", "--lengths", "800", "1600", "--samples", "1", "--out", str(tmp_path), "--run-id", "kv",
                 "--no-progress"]) == 0
    import pandas as pd

    df = pd.read_parquet(tmp_path / "kv" / "results.parquet")
    assert len(df) == 10 and (df["score"] == 1.0).all() and set(df["task"]) == {"kv_retrieval"}
    assert (df["n_prompt_tokens"] == df["context_length"]).all() and (df["max_new_tokens"] == 50).all()


@needs_hf
def test_lengths_right_above_the_minimum_build_where_space_runs_are_tokens(tmp_path):
    """SmolLM2/StarCoder-style vocabularies hold whitespace runs as tokens (2 tokens for any run of 2-21 spaces):
    spaces alone could not pad, so with SmolLM2 every length from min + 9 to min + 55 (one pair) was unbuildable
    and became unsupported rows. Newline-space units pad where spaces cannot."""
    from tokenizer_fixtures import build_rust
    from transformers import PreTrainedTokenizerFast

    from evalctx.models.tokenizer import HFTokenizer

    rust, specials = build_rust("bpe_llama3")
    rust.add_tokens([" " * k for k in range(2, 22)])  # whitespace runs as single tokens
    PreTrainedTokenizerFast(tokenizer_object=rust, **specials).save_pretrained(str(tmp_path))
    tok = HFTokenizer(tmp_path)
    assert len(tok.encode("x" + " " * 12 + "}")) <= 3
    task = get_task("kv_retrieval")(tok, {})
    lo = task.min_length()
    for length in range(lo, lo + 40, 3):
        s = task.make_sample(length, 0.5, length)
        check_kv_sample(task, s, length, 0.5)
