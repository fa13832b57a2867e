"""RULER's eight NIAH configurations by name, its key kinds and its distractor-needle haystack."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizer_fixtures import CHAT_TOKENIZER_NAMES, TOKENIZER_NAMES, get_tokenizer

from evalctx.config import load_suite
from evalctx.errors import LengthError
from evalctx.records import Sample
from evalctx.tasks.scoring import get_scorer
from evalctx.tasks import get_task
from evalctx.tasks.distractors import DistractorHaystack
from evalctx.tasks.keys import ADJECTIVES, NOUNS, draw, draw_pooled, in_distractor_pool
from evalctx.tasks.niah import NEEDLE
from evalctx.models.tokenizer import ByteTokenizer

ROOT = Path(__file__).resolve().parent.parent

# NVIDIA/RULER scripts/synthetic.yaml, the eight niah entries:
# name: (type_haystack, type_needle_k, type_needle_v, num_needle_k, num_needle_v, num_needle_q)
RULER_SYNTHETIC = {
    "niah_single_1": ("repeat", "words", "numbers", 1, 1, 1),
    "niah_single_2": ("essay", "words", "numbers", 1, 1, 1),
    "niah_single_3": ("essay", "words", "uuids", 1, 1, 1),
    "niah_multikey_1": ("essay", "words", "numbers", 4, 1, 1),
    "niah_multikey_2": ("needle", "words", "numbers", 1, 1, 1),
    "niah_multikey_3": ("needle", "uuids", "uuids", 1, 1, 1),
    "niah_multivalue": ("essay", "words", "numbers", 1, 4, 1),
    "niah_multiquery": ("essay", "words", "numbers", 1, 1, 4),
}
KIND_PATTERN = {"words": r"[a-z]+-[a-z]+", "numbers": r"\d{7}",
                "uuids": r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"}
NEEDLE_LINE = re.compile(r"One of the special magic (\w+) for (\S+) is: (\S+)\.")


def test_the_ruler_suite_is_rulers_eight_configurations():
    suite = load_suite("ruler")
    assert [t.name for t in suite.tasks] == list(RULER_SYNTHETIC)
    for ts in suite.tasks:
        hay, kk, vk, k, v, q = RULER_SYNTHETIC[ts.name]
        cls = get_task(ts.task)
        task = cls(ByteTokenizer(), ts.options)
        # niah.py: num_needle_k = max(num_needle_k, num_needle_q); "repeat" is the noise haystack
        assert (cls.num_k, cls.num_v, cls.num_q) == (max(k, q), v, q), ts.name
        assert task.options["haystack"] == {"repeat": "noise"}.get(hay, hay)
        assert (task.options["key_type"], task.options["value_type"]) == (kk, vk)
        assert ts.max_new_tokens is None and task.default_max_new_tokens == 128  # tokens_to_generate
        assert ts.lengths == [4096, 8192, 16384, 32768, 65536, 131072]  # RULER's SEQ_LENGTHS
    packaged = ROOT / "evalctx" / "suites" / "ruler.toml"
    assert packaged.read_text() == (ROOT / "tasks" / "ruler.toml").read_text()


def test_every_ruler_configuration_builds_and_scores():
    suite = load_suite("ruler")
    for ts in suite.tasks:
        task = get_task(ts.task)(ByteTokenizer(), ts.options)
        s = task.make_sample(3000, 0.4, 11)
        hay, kk, vk, k, v, q = RULER_SYNTHETIC[ts.name]
        assert len(s.prompt_ids) == 3000 and len(s.target) == v * q
        assert all(re.fullmatch(KIND_PATTERN[vk], t) for t in s.target)
        assert all(re.fullmatch(KIND_PATTERN[kk], key) for key in s.meta["keys"])
        assert get_scorer(s.scorer)(" " + ", ".join(s.target), s.target).value == 1.0


# NVIDIA/RULER scripts/data/synthetic/constants.py TASKS["niah"]: template and answer_prefix, which prepare.py joins
# (after the model template, "base" here: nothing) into the --template niah.py formats.
RULER_TEMPLATE = ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize "
                  "it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special "
                  "magic {type_needle_v} for {query} mentioned in the provided text?")
RULER_ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"


def ruler_input_text(type_needle_v: str, num_v: int, num_q: int, context: str, query: str) -> str:
    """niah.py generate_input_output, from ``template = args.template`` on, as written there."""
    template = RULER_TEMPLATE + RULER_ANSWER_PREFIX
    if num_q * num_v == 1:
        template = template.replace('Some', 'A')
        template = template.replace('are all', 'is')
        template = template.replace('are', 'is')
        template = template.replace('answers', 'answer')
        type_needle_v = type_needle_v[:-1]  # remove "s"
    return template.format(type_needle_v=type_needle_v, context=context, query=query)


def test_every_ruler_prompt_is_niah_py_around_its_context():
    """Character for character: the eight configurations' prompts are what niah.py's last step renders around the
    haystack-with-needles, and every needle (real or distractor) is niah.py's needle with the plural kind."""
    for ts in load_suite("ruler").tasks:
        _, _, vk, _, v, q = RULER_SYNTHETIC[ts.name]
        s = get_task(ts.task)(ByteTokenizer(), ts.options).make_sample(2500, 0.3, 4)
        start = s.prompt.index(" afterwards.\n") + len(" afterwards.\n")
        context = s.prompt[start:s.prompt.rindex("\nWhat ")]
        assert s.prompt == ruler_input_text(vk, v, q, context, s.meta["key"]), ts.name
        asked = s.meta["key"].replace(", and ", ", ").split(", ")
        assert s.meta["key"] == (", ".join(asked[:-1]) + ", and " + asked[-1] if len(asked) > 1 else asked[0])
        assert len(asked) == q and set(asked) <= set(s.meta["keys"])
        for kind, key, value in NEEDLE_LINE.findall(context):
            assert f"One of the special magic {kind} for {key} is: {value}." == NEEDLE.format(
                type_v=vk, key=key, value=value) and kind == vk


def test_key_kinds_are_rulers():
    rng = random.Random(0)
    for kind, pattern in KIND_PATTERN.items():
        values = [draw(kind, rng) for _ in range(50)]
        assert all(re.fullmatch(pattern, x) for x in values) and len(set(values)) > 40
    w = draw("words", rng).split("-")
    assert w[0] in ADJECTIVES and w[1] in NOUNS
    with pytest.raises(ValueError, match="unknown key kind"):
        draw("letters", rng)


def test_the_pools_split_each_kind_in_two_fixed_halves():
    rng = random.Random(1)
    for kind in KIND_PATTERN:
        mine = [draw_pooled(kind, rng, distractor=False) for _ in range(200)]
        theirs = [draw_pooled(kind, rng, distractor=True) for _ in range(200)]
        assert not any(map(in_distractor_pool, mine)) and all(map(in_distractor_pool, theirs))
        assert not set(mine) & set(theirs)
    all_words = [f"{a}-{n}" for a in ADJECTIVES for n in NOUNS]
    share = sum(map(in_distractor_pool, all_words)) / len(all_words)
    assert 0.45 < share < 0.55


def test_distractor_haystack_is_deterministic_and_grows_as_a_prefix():
    a = DistractorHaystack(NEEDLE, "words", "numbers")
    b = DistractorHaystack(NEEDLE, "words", "numbers")
    assert a.text == b.text and a.fingerprint == b.fingerprint
    start, fp = a.text, a.fingerprint
    a.stream(ByteTokenizer(), 200_000)
    assert len(a.text) >= 200_000 and a.text.startswith(start) and a.fingerprint == fp
    assert a.boundaries == [0] + [m.end() for m in re.finditer("\n", a.text)][:-1]
    lines = a.text.splitlines()
    assert all(NEEDLE_LINE.fullmatch(line) for line in lines)
    keys = [NEEDLE_LINE.fullmatch(line).group(2) for line in lines]
    assert all(in_distractor_pool(k) and re.fullmatch(KIND_PATTERN["words"], k) for k in keys)
    assert DistractorHaystack(NEEDLE, "uuids", "uuids").fingerprint != fp


def test_distractor_word_keys_do_not_repeat_within_a_deck():
    """RULER's distractor keys come from millions of wonderwords pairs and practically never repeat; drawn with
    replacement from our ~9.6K the 128K haystack held ~1,200 keys twice or more (the first repeat at line 43),
    each with other values. Dealt from a deck, every key of the distractors' half comes once before any repeats."""
    from evalctx.tasks.keys import distractor_words

    deck = distractor_words()
    h = DistractorHaystack(NEEDLE, "words", "numbers")
    h.stream(ByteTokenizer(), 80 * (len(deck) + 50))  # ~70 bytes a line: the whole deck and the next one's start
    keys = [NEEDLE_LINE.fullmatch(line).group(2) for line in h.text.splitlines()]
    assert len(keys) > len(deck)
    assert sorted(keys[:len(deck)]) == deck  # each distractor key exactly once in the first deck


def check_needle_haystack_sample(task, s: Sample, length: int, key_type: str, value_type: str) -> None:
    assert len(s.prompt_ids) == length
    lines = NEEDLE_LINE.findall(s.prompt)
    placed = [(k, v) for _, k, v in lines if k in s.meta["keys"]]
    assert len(placed) == len(set(placed)) == task.num_k * task.num_v  # each placed needle exactly once
    asked_keys = re.split(r", (?:and )?", s.meta["key"])
    assert sorted(v for k, v in placed if k in asked_keys) == sorted(s.target)
    for kind, key, value in lines:
        assert kind == value_type and re.fullmatch(KIND_PATTERN[key_type], key)
        if key not in s.meta["keys"]:  # a distractor: never a placed key, never an answer
            assert value not in s.target and in_distractor_pool(key) and in_distractor_pool(value)
    for t in s.target:
        assert s.prompt.count(t) == 1  # the answer exactly once
    assert s.meta["haystack"] == "needle"


@st.composite
def needle_cases(draw_):
    tok = draw_(st.sampled_from(TOKENIZER_NAMES))
    mode = draw_(st.sampled_from(["raw", "chat"])) if tok in CHAT_TOKENIZER_NAMES else "raw"
    name = draw_(st.sampled_from(["niah_single", "niah_single", "niah_multiquery", "niah_multivalue"]))
    kinds = draw_(st.sampled_from([("words", "numbers"), ("uuids", "uuids"), ("numbers", "words")]))
    depth = draw_(st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(0, 1)))
    return tok, mode, name, kinds, depth, draw_(st.integers(0, 2**31)), draw_(st.integers(8, 2500))


def _needle_case(case):
    tok_name, mode, name, (kk, vk), depth, seed, extra = case
    options = {"haystack": "needle", "key_type": kk, "value_type": vk}
    task = get_task(name)(get_tokenizer(tok_name), options, mode)
    length = task.min_length() + extra
    try:
        s = task.make_sample(length, depth, seed)
    except LengthError:  # min_length is for one representative key
        length += 40
        s = task.make_sample(length, depth, seed)
    check_needle_haystack_sample(task, s, length, kk, vk)
    assert get_task(name)(get_tokenizer(tok_name), options, mode).make_sample(length, depth, seed) == s


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(needle_cases())
def test_needle_haystack_samples_hold_every_guarantee(case):
    _needle_case(case)


@pytest.mark.slow
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(needle_cases())
def test_needle_haystack_samples_hold_every_guarantee_thoroughly(case):
    _needle_case(case)


def test_needle_haystack_prompt_is_rulers():
    """RULER joins distractor lines with "\\n" and puts the needle between lines; the single-answer wording."""
    s = get_task("niah_single")(ByteTokenizer(), {"haystack": "needle"}).make_sample(4000, 0.5, 5)
    key, value = s.meta["key"], s.target[0]
    assert s.prompt.startswith("A special magic number is hidden within the following text. Make sure to memorize "
                               "it. I will quiz you about the number afterwards.\nOne of the special magic numbers "
                               "for ")
    assert re.search(rf"\.\nOne of the special magic numbers for {key} is: {value}\.\nOne of the special magic "
                     r"numbers for ", s.prompt)
    assert s.prompt.endswith(f"\nWhat is the special magic number for {key} mentioned in the provided text? "
                             f"The special magic number for {key} mentioned in the provided text is")
    assert len(NEEDLE_LINE.findall(s.prompt)) > 40


def test_old_sample_ids_and_prompts_are_unchanged():
    """Ids and prompts as evalctx made them before key_type became an option (commit 412ee44): old runs resume."""
    import hashlib

    from evalctx.config import Suite, TaskSpec
    from evalctx.run.sampling import enumerate_specs

    suite = Suite("ids", [TaskSpec("passkey", [700], [0.0, 1.0]), TaskSpec("niah_single", [800], [0.5]),
                          TaskSpec("niah_multikey", [900], [0.25])])
    assert [(s.id, s.seed) for s in enumerate_specs(suite, ByteTokenizer())] == [
        ("cb95a60253645136", 80060652), ("0b7b98b0e8808af9", 1350382849), ("0ed7b995af6b8378", 1201775229),
        ("3dd31816ad8e503e", 1924690098)]
    s = get_task("niah_single")(ByteTokenizer(), {"haystack": "essay", "value_type": "uuids"}).make_sample(
        1000, 0.5, 7)
    assert (s.id, hashlib.sha1(s.prompt.encode()).hexdigest()[:16]) == ("2585e2c5d76fd8a0", "3d8c9c91617ab829")


def test_the_ruler_suite_runs_with_eight_rows_and_their_average(tmp_path, capsys):
    import pandas as pd

    from evalctx.cli import main

    assert main(["run", "--suite", "ruler", "--backend", "fake", "--tokenizer", "byte", "--lengths", "1200",
                 "--samples", "1", "--out", str(tmp_path), "--run-id", "r", "--no-progress"]) == 0
    out = capsys.readouterr().out
    df = pd.read_parquet(tmp_path / "r" / "results.parquet")
    assert sorted(df["task"].unique()) == sorted(RULER_SYNTHETIC) and (df["score"] == 1.0).all()
    assert df.groupby("task")["task_type"].first().to_dict()["niah_multikey_3"] == "niah_single"
    assert "average over the 8 tasks, as RULER reports it" in out and "   1200 | 100.0" in out
