"""The task generators: registry, prompts as upstream writes them, options, and the per-sample guarantees."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizer_fixtures import CHAT_TOKENIZER_NAMES, HAVE_HF, TOKENIZER_NAMES, get_tokenizer

from evalctx.errors import LengthError, UsageError
from evalctx.records import Sample
from evalctx.tasks.scoring import get_scorer
from evalctx.tasks import TASKS, get_task, list_tasks
from evalctx.tasks.base import Task
from evalctx.models.tokenizer import ByteTokenizer

TRTLLM_PREFIX = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information.\n\n")
NOISE_LINE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
TASK_OPTIONS = [
    ("passkey", {}), ("passkey", {"haystack": "essay"}), ("passkey", {"template": "landmark"}),
    ("passkey", {"template": "landmark", "haystack": "essay"}), ("passkey", {"key_digits": 8}),
    ("niah_single", {}), ("niah_single", {"haystack": "essay"}), ("niah_single", {"value_type": "uuids"}),
    ("niah_multikey", {}), ("niah_multivalue", {"haystack": "noise"}), ("niah_multiquery", {"value_type": "uuids"}),
]
needs_hf = pytest.mark.skipif(not HAVE_HF, reason="needs tokenizers and transformers")
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
THOROUGH = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def needle_texts(s: Sample) -> list[str]:
    if s.task == "passkey":
        k = s.meta["key"]
        return [f"The pass key is {k}. Remember it. {k} is the pass key."]
    return re.findall(r"One of the special magic \w+ for [\w-]+ is: [\w-]+\.", s.prompt)


def check_sample(task: Task, s: Sample, length: int, depth: float, seed: int) -> None:
    tok = task.tokenizer
    assert len(s.prompt_ids) == s.context_length == length
    assert tok.encode(s.prompt, s.add_special_tokens, s.special_spans) == s.prompt_ids
    assert s.add_special_tokens == (task.prompt_mode == "raw") and s.prompt_mode == task.prompt_mode
    assert (s.task, s.depth, s.seed, s.scorer) == (task.name, depth, seed, task.scorer)
    needles = needle_texts(s)
    assert needles
    for n in needles:
        assert s.prompt.count(n) == 1  # each needle exactly once
    for t in s.target:  # every answer occurs only inside the needles
        assert s.prompt.count(t) == sum(n.count(t) for n in needles) >= 1
    # the needle token index points at the (first) needle
    _, offsets = tok.encode_with_offsets(s.prompt, s.add_special_tokens, s.special_spans)
    first = min(s.prompt.index(n) for n in needles)
    i = s.needle_token_index
    assert offsets[i][0] <= first < max(offsets[i][1], offsets[i][0] + 1) or (
        offsets[i][0] >= first and offsets[i - 1][1] <= first)
    if s.depth_actual is not None:
        assert 0.0 <= s.depth_actual <= 1.0
    # the scorer accepts the right answer and rejects a wrong one
    scorer = get_scorer(s.scorer)
    assert scorer(" " + ", ".join(s.target) + ".", s.target).value == 1.0
    assert scorer(" 0", s.target).value == 0.0
    assert s.meta["haystack"] == task.haystack.name
    # the answer's length in tokens is what appending it to this very prompt adds
    answer = " " + ", ".join(s.target)
    added = len(tok.encode(s.prompt + answer, s.add_special_tokens, s.special_spans)) - len(s.prompt_ids)
    assert s.meta["answer_tokens"] == added


@st.composite
def cases(draw):
    name, options = draw(st.sampled_from(TASK_OPTIONS))
    tok = draw(st.sampled_from(TOKENIZER_NAMES))
    mode = draw(st.sampled_from(["raw", "chat"])) if tok in CHAT_TOKENIZER_NAMES else "raw"
    depth = draw(st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(0, 1)))
    seed = draw(st.integers(0, 2**31))
    extra = draw(st.integers(8, 2500))
    return name, options, tok, mode, depth, seed, extra


def _sample_case(case):
    name, options, tok_name, mode, depth, seed, extra = case
    task = get_task(name)(get_tokenizer(tok_name), options, mode)
    length = task.min_length() + extra
    try:
        s = task.make_sample(length, depth, seed)
    except LengthError:
        # min_length is measured for one representative key; a longer key may need a few more tokens
        s = task.make_sample(length + 40, depth, seed)
        length += 40
    check_sample(task, s, length, depth, seed)
    # same inputs, same sample -- from a fresh task instance too
    again = get_task(name)(get_tokenizer(tok_name), dict(options), mode).make_sample(length, depth, seed)
    assert again == s


@SETTINGS
@given(cases())
def test_samples_hold_every_guarantee(case):
    _sample_case(case)


@pytest.mark.slow
@THOROUGH
@given(cases())
def test_samples_hold_every_guarantee_thoroughly(case):
    _sample_case(case)


def _sweep(tok_name: str, mode: str, task_name: str, depths, start: int, count: int) -> None:
    """Every length of ``count`` consecutive ones from ``min_length() + start`` builds at every depth.

    The only LengthErrors allowed: too short for the drawn key (min_length is for one representative key), and the
    documented set right at a draw's minimum (a haystack of one or two tokens brings the needle's separator along).
    """
    task = get_task(task_name)(get_tokenizer(tok_name), {}, mode)
    lo = task.min_length()
    bad = []
    for length in range(lo + start, lo + start + count):
        for depth in depths:
            try:
                s = task.make_sample(length, depth, 1)
            except LengthError as exc:
                m = re.search(r"(?:the minimum is|need) (\d+)", str(exc))
                if "too short" in str(exc) or (m and length - int(m.group(1)) <= 2):
                    continue
                bad.append((length, depth))
                continue
            assert len(s.prompt_ids) == length and s.depth == depth
    assert not bad, f"{task_name} {mode} with {tok_name}: no exact build at {bad}"


SWEEP = [(t, m, k) for t in TOKENIZER_NAMES for m in ("raw", "chat") if m == "raw" or t in CHAT_TOKENIZER_NAMES
         for k in ("passkey", "niah_single")]


@pytest.mark.parametrize("tok_name,mode,task_name", [c for c in SWEEP if c[0] in ("bpe_gpt2", "byte")])
def test_every_length_builds(tok_name, mode, task_name):
    """Consecutive lengths x depths 0, 0.5, 1: a seam that jumps over a count must not make any length unbuildable."""
    _sweep(tok_name, mode, task_name, (0.0, 0.5, 1.0), 0, 40)


@pytest.mark.slow
@pytest.mark.parametrize("tok_name,mode,task_name", SWEEP)
def test_every_length_builds_thoroughly(tok_name, mode, task_name):
    _sweep(tok_name, mode, task_name, (0.0, 0.5, 1.0), 0, 150)
    _sweep(tok_name, mode, task_name, (0.0, 0.5, 1.0), 1500, 150)


def test_sample_id_depends_on_everything_that_matters():
    tok = ByteTokenizer(chat=True)
    base = get_task("passkey")(tok, {}).make_sample(1500, 0.5, 3)
    ids = {base.id}
    variants = [
        get_task("passkey")(tok, {}).make_sample(1500, 0.5, 4),
        get_task("passkey")(tok, {}).make_sample(1501, 0.5, 3),
        get_task("passkey")(tok, {}).make_sample(1500, 0.25, 3),
        get_task("passkey")(tok, {}).make_sample(1500, 0.5, 3, max_new_tokens=7),
        get_task("passkey")(tok, {}, "chat").make_sample(1500, 0.5, 3),
        get_task("passkey")(ByteTokenizer(), {}).make_sample(1500, 0.5, 3),
        get_task("passkey")(tok, {"haystack": "essay"}).make_sample(1500, 0.5, 3),
        get_task("passkey")(tok, {"key_digits": 6}).make_sample(1500, 0.5, 3),
        get_task("niah_single")(tok, {}).make_sample(1500, 0.5, 3),
    ]
    for v in variants:
        assert v.id not in ids
        ids.add(v.id)
    # default options spelled out give the same sample
    same = get_task("passkey")(tok, {"template": "trtllm", "key_digits": 5, "haystack": "noise"}).make_sample(
        1500, 0.5, 3)
    assert same == base and re.fullmatch(r"[0-9a-f]{16}", base.id)


def test_spec_ids_are_the_sample_ids(tmp_path):
    """A suite's spec id is the task's own sample id: options with defaults filled in, the haystack's content."""
    from evalctx.config import Suite, TaskSpec
    from evalctx.run.sampling import SampleBuilder, enumerate_specs

    tok = ByteTokenizer()
    (tmp_path / "a.txt").write_text("One sentence here. Another one there. And a third.")
    tables = [TaskSpec("passkey", [700, 900], [0.0, 1], samples=2), TaskSpec("niah_single", [800], [0.5]),
              TaskSpec("passkey", [700], [0.5], options={"haystack": "essay", "haystack_dir": str(tmp_path)},
                       name="passkey_essay")]
    suite = Suite("ids", tables)
    specs = enumerate_specs(suite, tok)
    builder = SampleBuilder(suite, tok)
    for spec in specs:
        assert builder.build(spec).id == spec.id
    # the defaults spelled out are the same cells (listed twice: run once)
    spelled = Suite("ids", [TaskSpec("passkey", [700, 900], [0.0, 1.0], samples=2,
                                     options={"template": "trtllm", "key_digits": 5, "haystack": "noise"}),
                            TaskSpec("passkey", [700, 900], [0.0, 1.0], samples=2)])
    assert [s.id for s in enumerate_specs(spelled, tok)] == [s.id for s in specs[:8]]
    # editing the haystack files changes the ids, and the built samples agree
    (tmp_path / "a.txt").write_text("One sentence here. Another one there. And a fourth.")
    edited = enumerate_specs(suite, tok)
    assert edited[:-1] == specs[:-1] and edited[-1].id != specs[-1].id
    assert SampleBuilder(suite, tok).build(edited[-1]).id == edited[-1].id


def test_registry():
    assert set(TASKS) == {"passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery",
                          "kv_retrieval"}
    for name, desc in list_tasks():
        assert issubclass(get_task(name), Task) and get_task(name).name == name and desc
    with pytest.raises(UsageError, match="unknown task 'nope'.*niah_single.*passkey"):
        get_task("nope")


def test_passkey_trtllm_prompt_is_upstream():
    s = get_task("passkey")(ByteTokenizer(), {}).make_sample(2000, 0.5, 0)
    key = s.meta["key"]
    assert re.fullmatch(r"\d{5}", key) and s.target == [key]
    assert s.prompt.startswith(TRTLLM_PREFIX + NOISE_LINE + "\n" + NOISE_LINE + "\n")
    assert s.prompt.endswith("\n\nWhat is the pass key?\n\nThe pass key is")
    assert f"\n{NOISE_LINE}\nThe pass key is {key}. Remember it. {key} is the pass key.\n{NOISE_LINE}\n" in s.prompt
    assert (s.scorer, s.max_new_tokens, s.prompt_ids[0]) == ("first_int_match", 6, ByteTokenizer.BOS)
    assert s.meta == {"haystack": "noise", "template": "trtllm", "key": key, "answer_tokens": 6}
    # at the very start and the very end the needle line touches the template
    s0 = get_task("passkey")(ByteTokenizer(), {}).make_sample(2000, 0.0, 0)
    assert s0.prompt.startswith(TRTLLM_PREFIX + f"The pass key is {s0.meta['key']}.")
    assert s0.depth_actual == 0.0
    s1 = get_task("passkey")(ByteTokenizer(), {}).make_sample(2000, 1.0, 0)
    assert s1.prompt.endswith(f"{s1.meta['key']} is the pass key.\n\n\nWhat is the pass key?\n\nThe pass key is")
    assert s1.depth_actual == 1.0


def test_passkey_keys_may_start_with_zero():
    keys = [get_task("passkey")(ByteTokenizer(), {}).make_sample(600, 0.5, seed).meta["key"] for seed in range(60)]
    assert all(len(k) == 5 and k.isdigit() for k in keys)
    assert any(k.startswith("0") for k in keys) and len(set(keys)) > 50


def test_passkey_landmark_prompt():
    s = get_task("passkey")(ByteTokenizer(), {"template": "landmark"}).make_sample(3000, 0.5, 1)
    key = s.meta["key"]
    assert 1 <= int(key) <= 50000 and s.target == [key]
    assert s.prompt.startswith("There is an important info hidden inside a lot of irrelevant text. Find it and "
                               "memorize them. I will quiz you about the important information there.\n"
                               + NOISE_LINE + " " + NOISE_LINE + " ")
    assert f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n" in s.prompt
    assert s.prompt.endswith("\nWhat is the pass key? The pass key is")
    assert (s.scorer, s.max_new_tokens) == ("landmark_int_match", 10)
    assert s.meta["template"] == "landmark"


def test_niah_single_prompt_is_ruler():
    s = get_task("niah_single")(ByteTokenizer(), {}).make_sample(3000, 0.5, 2)
    key = s.meta["key"]
    assert re.fullmatch(r"[a-z]+-[a-z]+", key) and re.fullmatch(r"\d{7}", s.target[0])
    assert s.prompt.startswith("A special magic number is hidden within the following text. Make sure to memorize "
                               "it. I will quiz you about the number afterwards.\n" + NOISE_LINE + "\n")
    assert s.prompt.endswith(f"\nWhat is the special magic number for {key} mentioned in the provided text? "
                             f"The special magic number for {key} mentioned in the provided text is")
    assert f"\nOne of the special magic numbers for {key} is: {s.target[0]}.\n{NOISE_LINE}" in s.prompt
    assert (s.scorer, s.max_new_tokens) == ("string_match_all", 128)


def test_niah_essay_and_uuids():
    s = get_task("niah_single")(ByteTokenizer(), {"haystack": "essay", "value_type": "uuids"}).make_sample(
        4000, 0.5, 2)
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", s.target[0])
    assert s.prompt.startswith("A special magic uuid is hidden within the following text. Make sure to memorize it. "
                               "I will quiz you about the uuid afterwards.\nOn Bridges and the People")
    assert re.search(r"[.?!] One of the special magic uuids for [\w-]+ is: [\w-]+\. [A-Z]", s.prompt)


@pytest.mark.parametrize("name,k,v,q", [("niah_multikey", 4, 1, 1), ("niah_multivalue", 1, 4, 1),
                                        ("niah_multiquery", 4, 1, 4)])
def test_niah_multi(name, k, v, q):
    task = get_task(name)(ByteTokenizer(), {})
    s = task.make_sample(6000, 0.2, 5)
    needles = needle_texts(s)
    assert len(needles) == k * v and len(s.meta["keys"]) == k and len(s.target) == v * q
    assert len(s.meta["needle_token_indices"]) == k * v
    positions = sorted(s.prompt.index(n) for n in needles)
    assert s.needle_token_index == min(s.meta["needle_token_indices"])
    # first at the depth, the rest spread evenly after it (gkamradt): gaps of about (1 - 0.2) / n of the haystack
    assert positions[0] / len(s.prompt) == pytest.approx(0.2, abs=0.06)
    gaps = [b - a for a, b in zip(positions, positions[1:])]
    assert max(gaps) - min(gaps) < 0.06 * len(s.prompt)
    plural = q * v > 1
    head = "Some special magic numbers are hidden" if plural else "A special magic number is hidden"
    assert s.prompt.startswith(head) and s.meta["haystack"] == "essay"
    tail = "are" if plural else "is"
    assert s.prompt.endswith(f"mentioned in the provided text {tail}")
    if q > 1:
        asked = s.meta["key"]
        assert re.fullmatch(r"[\w-]+, [\w-]+, [\w-]+, and [\w-]+", asked)


@needs_hf
def test_chat_mode_puts_the_answer_prefix_in_the_assistant_turn():
    tok = get_tokenizer("bpe_chat")
    s = get_task("passkey")(tok, {}, "chat").make_sample(700, 0.5, 1)
    assert s.prompt.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n" + TRTLLM_PREFIX)
    assert s.prompt.endswith("What is the pass key?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
                             "The pass key is")
    assert not s.add_special_tokens and s.prompt_ids.count(tok.hf.bos_token_id) == 1
    n = get_task("niah_single")(tok, {}, "chat").make_sample(700, 0.5, 1)
    assert n.prompt.endswith("<|end_header_id|>\n\nThe special magic number for "
                             f"{n.meta['key']} mentioned in the provided text is")
    with pytest.raises(UsageError, match="no chat template"):
        get_task("passkey")(ByteTokenizer(), {}, "chat")


@pytest.mark.parametrize("name,options,match", [
    ("passkey", {"colour": "red"}, "unknown option"), ("passkey", {"template": "gpt4"}, "unknown template"),
    ("passkey", {"template": "landmark", "key_digits": 5}, "key_digits applies"),
    ("passkey", {"key_digits": 0}, "key_digits"), ("passkey", {"haystack": "lake"}, "unknown haystack"),
    ("passkey", {"haystack_dir": "/tmp"}, "haystack_dir needs"),
    ("passkey", {"haystack": "essay", "haystack_dir": "/nonexistent/dir"}, "not found"),
    ("niah_single", {"value_type": "letters"}, "value_type"), ("niah_multikey", {"haystack": "lake"}, "haystack"),
    ("niah_single", {"key_type": "names"}, "key_type"),
    ("niah_single", {"haystack": "needle", "haystack_dir": "/tmp"}, "haystack_dir needs"),
    ("kv_retrieval", {"haystack": "noise"}, r"unknown option\(s\) haystack; known: none \(it takes no options\)"),
])
def test_bad_options(name, options, match):
    with pytest.raises(UsageError, match=match):
        get_task(name)(ByteTokenizer(), options)


def test_bad_sample_arguments():
    task = get_task("passkey")(ByteTokenizer(), {})
    with pytest.raises(UsageError, match="not percent"):
        task.make_sample(1000, 50, 0)
    with pytest.raises(UsageError, match="positive integer"):
        task.make_sample(0, 0.5, 0)
    with pytest.raises(UsageError, match="prompt_mode"):
        get_task("passkey")(ByteTokenizer(), {}, "completion")
    lo = task.min_length()
    with pytest.raises(LengthError, match=r"too short; the template and needle alone need \d+ tokens"):
        task.make_sample(lo // 2, 0.5, 0)


def test_custom_haystack_dir_and_key_redraw(tmp_path):
    tok = ByteTokenizer()
    first = get_task("passkey")(tok, {"haystack": "essay"}).make_sample(1500, 0.5, 9)
    key = first.meta["key"]
    # A corpus that already holds the key that seed would draw: the key is redrawn, deterministically.
    (tmp_path / "b.txt").write_text(f"Second file.   It mentions {key} once.\n\nAnd more text here? Yes!")
    (tmp_path / "a.txt").write_text("First file comes first. It has several sentences. Short ones.")
    (tmp_path / "notes.md").write_text("ignored")
    task = get_task("passkey")(tok, {"haystack": "essay", "haystack_dir": str(tmp_path)})
    s = task.make_sample(1500, 0.5, 9)
    assert s.meta["key"] != key and s.meta["haystack"] == f"essay:{tmp_path.name}"
    assert key in s.prompt  # where the (cycled) corpus has it, but it is no longer the answer
    check_sample(task, s, 1500, 0.5, 9)
    assert task.haystack.text.startswith("First file comes first.") and "ignored" not in task.haystack.text
    assert "It mentions" in s.prompt and "  " not in task.haystack.text  # whitespace normalised
    assert task.make_sample(1500, 0.5, 9) == s
    with pytest.raises(UsageError, match="no .txt files"):
        get_task("passkey")(tok, {"haystack": "essay", "haystack_dir": str(tmp_path / "..")})


def test_shipped_essays_are_digit_free_and_sizeable():
    from evalctx.tasks.haystack import DEFAULT_ESSAY_DIR, essay_haystack

    files = sorted(DEFAULT_ESSAY_DIR.glob("*.txt"))
    assert len(files) >= 5 and 25_000 <= sum(f.stat().st_size for f in files) <= 40_000
    text = essay_haystack().text
    assert not re.search(r"\d", text) and text.isascii()
    assert len(essay_haystack().boundaries) > 200


@pytest.mark.parametrize("haystack,sep", [("noise", "\n"), ("essay", " ")])
def test_niah_needles_at_the_very_end_stay_apart(haystack, sep):
    s = get_task("niah_multivalue")(ByteTokenizer(), {"haystack": haystack}).make_sample(3000, 1.0, 4)
    needles = needle_texts(s)
    assert len(needles) == 4
    block = sep.join(needles)  # one after the other, each separated as in the haystack, then the question
    assert s.prompt.count(block + "\nWhat are all the special magic numbers") == 1
    assert s.depth_actual == 1.0


@pytest.mark.parametrize("tok_name,mode", [(t, m) for t in TOKENIZER_NAMES for m in ("raw", "chat")
                                           if m == "raw" or t in CHAT_TOKENIZER_NAMES])
@pytest.mark.parametrize("task_name,options", [("passkey", {}), ("niah_single", {}), ("niah_multikey", {}),
                                               ("niah_multivalue", {"value_type": "uuids"}), ("kv_retrieval", {})])
def test_min_length_covers_the_draws(tok_name, mode, task_name, options):
    """min_length() is the longest minimum over many draws: at min_length() + NEAR_MINIMUM every draw builds, so
    the runner's up-front build of the near-minimum specs finds every sample a short length cannot hold."""
    from evalctx.run.sampling import SampleBuilder

    task = get_task(task_name)(get_tokenizer(tok_name), options, mode)
    lo = task.min_length()
    for seed in range(100, 115):
        for depth in (0.0, 0.5, 1.0):
            s = task.make_sample(lo + SampleBuilder.NEAR_MINIMUM, depth, seed)
            assert len(s.prompt_ids) == lo + SampleBuilder.NEAR_MINIMUM


@pytest.mark.parametrize("tok_name,digits,budget", [("byte", 8, 9), ("byte", 5, 6), ("byte", 3, 6),
                                                    ("bpe_digits", 8, 9)])
def test_default_budget_follows_the_answer(tok_name, digits, budget):
    """' ' + k digits: k + 1 tokens where every digit is a token; the upstream 6 where that is enough."""
    if tok_name != "byte" and not HAVE_HF:
        pytest.skip("needs tokenizers and transformers")
    task = get_task("passkey")(get_tokenizer(tok_name), {"key_digits": digits})
    assert task.default_budget() == budget
    s = task.make_sample(task.min_length() + 100, 0.5, 0)
    assert s.max_new_tokens == budget >= s.meta["answer_tokens"]


def test_default_budget_of_four_uuids_with_a_byte_tokenizer():
    """RULER's 128 cannot hold four uuids one byte per token (4 x 36 + 3 x 2 + 1 = 151)."""
    task = get_task("niah_multivalue")(ByteTokenizer(), {"value_type": "uuids"})
    assert task.answer_tokens() == 151 and task.default_budget() == 151
