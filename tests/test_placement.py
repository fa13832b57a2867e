"""The exact-length assembler: property tests over real tokenizers, lengths, depths, needles and prompt modes."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizer_fixtures import CHAT_TOKENIZER_NAMES, HAVE_HF, HF_KINDS, TOKENIZER_NAMES, get_tokenizer

from evalctx.errors import LengthError, UsageError
from evalctx.tasks.haystack import NOISE_SENTENCE, Haystack, essay_haystack, noise_haystack
from evalctx.tasks.placement import SENTINEL, Needle, assemble, minimum_length, render_frame
from evalctx.models.tokenizer import ByteTokenizer, load_tokenizer

HAYSTACKS = {"noise": lambda: noise_haystack("\n"), "noise_inline": lambda: noise_haystack(" "),
             "essay": lambda: essay_haystack()}
USER = "Read this.\n\n" + SENTINEL + "\n\nWhat is the pass key?"
PREFIX = "\n\nThe pass key is"
needs_hf = pytest.mark.skipif(not HAVE_HF, reason="needs tokenizers and transformers")
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
THOROUGH = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def needles_for(hay: Haystack, n: int) -> list[Needle]:
    sep = "\n" if hay.unit == "line" else " "
    return [Needle(f"The pass key is {40213 + i}. Remember it. {40213 + i} is the pass key.", sep) for i in range(n)]


def spread(depth: float, n: int) -> list[float]:
    return [depth + i * (1 - depth) / n for i in range(n)]


def check(tok, frame, hay, needles, depths, length, asm) -> None:
    """Every guarantee of the assembler, checked from the outside."""
    # exact length, and the ids are what a plain tokenization of the text gives
    assert len(asm.ids) == length
    assert tok.encode(asm.text, frame.add_special_tokens, asm.special_spans) == asm.ids
    assert asm.text.startswith(frame.pre) and asm.text.endswith(frame.post)
    # the context is one contiguous slice of the filler text with the needles spliced in at their positions
    stream = hay.stream(tok, 0)
    s, e = asm.window
    other = " " if hay.joiner == "\n" else "\n"

    def context(glue: int, pad: str) -> str:
        parts, cur = [], s
        for i, (n, p) in enumerate(zip(needles, asm.positions)):
            last = i == len(needles) - 1 and p == e  # only the needle that ends the haystack drops its separator
            # the first needle after a cut last sentence (line) is set apart by the haystack's joiner; a count
            # that needs it may put it after a whole one too (glue 1), leave it out (glue 2), or put the joiner
            # twice, the other unit's joiner, or both (3-5: windows whose end moves by several tokens at a time)
            first = p == e and p > s and (i == 0 or asm.positions[i - 1] != p)
            wanted = glue == 1 or (glue == 0 and not hay.is_boundary(p))
            joiner = {1: hay.joiner, 3: hay.joiner * 2, 4: other, 5: hay.joiner + other}.get(glue, "")
            joiner = hay.joiner if glue == 0 and wanted else joiner
            joiner = joiner if first and not n.text[:1].isspace() else ""
            parts += [stream.text[cur:p], joiner + (n.text if last else n.text + n.sep)]
            cur = p
        parts.append(stream.text[cur:e])
        return "".join(parts) + pad  # whitespace the window's end may carry before post

    pads = ("", hay.joiner, hay.joiner * 2, other, other * 2, hay.joiner + other, hay.joiner * 2 + other)
    assert asm.text[len(frame.pre):len(asm.text) - len(frame.post)] in {context(g, pad) for g in range(6)
                                                                         for pad in pads}
    # each needle text occurs exactly once
    for n in needles:
        assert asm.text.count(n.text.strip()) == 1
    # needles sit on boundaries, in order
    assert list(asm.positions) == sorted(asm.positions)
    inner = hay.boundary_at_or_after(s) <= e
    for p, d in zip(asm.positions, depths):
        assert p == e if d >= 1.0 else hay.is_boundary(p) or not inner  # depth 1: the very end, before ``post``
    # the window starts where the filler starts (a later start only as the last fallback), so the prompts of a
    # depth sweep share their prefix up to the earlier needle
    assert stream.token_at(s) < 4
    # the first needle is on a boundary nearest its depth: no other boundary between it and the depth point
    a = stream.token_at(s)
    if depths[0] >= 1.0:
        pass
    elif inner:
        x = stream.starts[a + round(depths[0] * (stream.token_at(e) - a))]
        lo, hi = sorted((x, asm.positions[0]))
        assert hay.boundary_at_or_after(lo + 1) >= hi
    # the needle token index points at the needle's first character
    ids, offsets = tok.encode_with_offsets(asm.text, frame.add_special_tokens, asm.special_spans)
    for c, i in zip(asm.needle_chars, asm.needle_token_indices):
        assert asm.text[c:].startswith(needles[asm.needle_chars.index(c)].text.strip()[:10])
        assert offsets[i][0] <= c < max(offsets[i][1], offsets[i][0] + 1) or (
            offsets[i][0] >= c and offsets[i - 1][1] <= c)
    assert asm.needle_token_index == min(asm.needle_token_indices)
    # the actual depth is within about one sentence of the asked one
    if asm.depth_actual is not None and asm.haystack_tokens > 200:
        assert 0.0 <= asm.depth_actual <= 1.0
        longest = max_gap_tokens(hay, stream, s, e)
        assert abs(asm.depth_actual - depths[0]) * asm.haystack_tokens <= longest + 4


def max_gap_tokens(hay, stream, s, e) -> int:
    gap, c = 0, hay.boundary_at_or_after(s)
    prev = s
    while c <= e:
        gap = max(gap, stream.token_at(c) - stream.token_at(prev))
        prev, c = c, hay.boundary_at_or_after(c + 1)
    return max(gap, stream.token_at(e) - stream.token_at(prev))


@st.composite
def cases(draw):
    name = draw(st.sampled_from(TOKENIZER_NAMES))
    mode = draw(st.sampled_from(["raw", "chat"])) if name in CHAT_TOKENIZER_NAMES else "raw"
    hay = draw(st.sampled_from(sorted(HAYSTACKS)))
    n = draw(st.sampled_from([1, 1, 1, 2, 4]))
    depth = draw(st.one_of(st.just(0.0), st.just(1.0), st.just(0.5), st.floats(0, 1)))
    extra = draw(st.one_of(st.integers(0, 40), st.integers(0, 3000)))
    return name, mode, hay, n, depth, extra


def _assemble_case(case):
    name, mode, hay_name, n, depth, extra = case
    tok, hay = get_tokenizer(name), HAYSTACKS[hay_name]()
    frame = render_frame(tok, mode, USER, PREFIX)
    needles, depths = needles_for(hay, n), spread(depth, n)
    length = minimum_length(tok, frame, hay, needles, depths) + extra
    try:
        asm = assemble(tok, frame, hay, needles, depths, length, label="prop")
    except LengthError as exc:
        # A haystack of one or two tokens cannot always be made (the needle's separator comes with it).
        assert extra < 4 and "the minimum is" in str(exc)
        return
    check(tok, frame, hay, needles, depths, length, asm)


@SETTINGS
@given(cases())
def test_assemble_exact_length_and_placement(case):
    _assemble_case(case)


@pytest.mark.slow
@THOROUGH
@given(cases())
def test_assemble_exact_length_and_placement_thoroughly(case):
    _assemble_case(case)


@pytest.mark.parametrize("name", HF_KINDS)
def test_every_length_in_a_range_builds(name):
    """Seams make some budgets jump over the target; the fallbacks must still reach every single length."""
    tok, hay = get_tokenizer(name), noise_haystack("\n")
    frame = render_frame(tok, "raw", USER, PREFIX)
    needles = needles_for(hay, 1)
    lo = minimum_length(tok, frame, hay, needles, [0.0])
    for length in range(lo + 4, lo + 64):
        for depth in (0.0, 1.0):
            asm = assemble(tok, frame, hay, needles, [depth], length)
            assert len(asm.ids) == length


@pytest.mark.parametrize("mode", ["raw", "chat"])
def test_depth_one_reaches_every_length_when_the_start_seam_jumps(mode):
    """GPT-2's pre-tokenizer splits the template's closing "\n\n" before ``.``/``The`` but not before `` word``.

    The needle at depth 1 sits at the very end of a window that starts with the filler, every length of a range
    builds, and the window leaves the filler's start only for the counts no end reaches.
    """
    if not HAVE_HF:
        pytest.skip("needs tokenizers and transformers")
    tok, hay = get_tokenizer("bpe_gpt2"), noise_haystack("\n")
    frame = render_frame(tok, mode, USER, PREFIX)
    assert frame.pre.endswith("\n\n")
    needles = [Needle("The pass key is 40213. Remember it. 40213 is the pass key.\n")]  # passkey's: no separator
    lo = minimum_length(tok, frame, hay, needles, [1.0])
    at_start = 0
    for length in range(lo + 600, lo + 660):
        asm = assemble(tok, frame, hay, needles, [1.0], length)
        check(tok, frame, hay, needles, [1.0], length, asm)
        assert asm.positions[0] == asm.window[1]
        at_start += asm.window[0] == 0
    assert at_start >= 50


@pytest.mark.parametrize("name,hay_name,length", [
    ("tiny", "noise", 3000), ("tiny", "noise", 131072),  # at 131072 a line end + "The" + joiner jumps one count
    ("bpe_llama3", "essay", 3000), ("sp_llama2", "noise", 3000), ("bpe_gpt2", "essay", 3000)])
def test_a_depth_sweep_shares_the_prefix_up_to_the_earlier_needle(name, hay_name, length):
    """Depth 1 included: each prompt of a sweep equals the depth-1 one up to its own needle (the prefix reuse of
    evalctx/run/prefix_order.py depends on it), and the depth-1 needle follows the haystack's joiner after a cut unit."""
    if name != "tiny" and not HAVE_HF:
        pytest.skip("needs tokenizers and transformers")
    tok = load_tokenizer("tiny") if name == "tiny" else get_tokenizer(name)
    hay = HAYSTACKS[hay_name]()
    frame = render_frame(tok, "raw", USER, PREFIX)
    needles = needles_for(hay, 1)
    builds = {d: assemble(tok, frame, hay, needles, [d], length) for d in (0.0, 0.3, 0.5, 0.9, 1.0)}
    top = builds[1.0]
    assert top.depth_actual == 1.0 and top.window[0] == 0
    for d, asm in builds.items():
        cut = asm.needle_token_indices[0]
        assert asm.ids[:cut - 1] == top.ids[:cut - 1], d
        assert cut > 0.9 * d * asm.haystack_tokens


@pytest.mark.parametrize("name", TOKENIZER_NAMES)
def test_long_builds_verify_once(name):
    """The seam estimate is exact, so the one full tokenization is the verification that passes."""
    tok = get_tokenizer(name)
    frame = render_frame(tok, "raw", USER, PREFIX)
    for hay in (noise_haystack("\n"), essay_haystack()):
        needles = needles_for(hay, 1)
        for length, depth in ((6000, 0.3), (9000, 0.77), (12000, 1.0)):
            asm = assemble(tok, frame, hay, needles, [depth], length)
            assert len(asm.ids) == length and asm.verifications == 1


@needs_hf
def test_a_prefix_space_tokenizer_builds_lengths_far_above_the_minimum():
    """ByteLevel with add_prefix_space: the seam estimate is off by one either way from layout to layout, so some
    lengths far above the minimum took 6-8 verifications; with 5 they were unsupported rows (1 in 70 samples)."""
    from tokenizer_fixtures import hf_tokenizer

    from evalctx.tasks import get_task

    tok = hf_tokenizer("bpe_prefix_space")
    niah = get_task("niah_single")(tok, {"haystack": "essay", "value_type": "uuids"})
    passkey = get_task("passkey")(tok, {"haystack": "essay"})
    for task, length, depth in ((niah, 252, 0.0), (niah, 347, 0.0), (niah, 1472, 0.5), (passkey, 579, 1.0),
                                (passkey, 1144, 0.0), (passkey, 1579, 0.5)):
        s = task.make_sample(length, depth, length)
        assert len(s.prompt_ids) == length == len(tok.encode(s.prompt, True, s.special_spans))


@needs_hf
def test_too_short_names_the_minimum():
    tok, hay = get_tokenizer("bpe_llama3"), noise_haystack()
    frame = render_frame(tok, "raw", USER, PREFIX)
    needles = needles_for(hay, 1)
    lo = minimum_length(tok, frame, hay, needles, [0.5])
    assert len(assemble(tok, frame, hay, needles, [0.5], lo).ids) == lo  # the minimum itself builds
    with pytest.raises(LengthError, match=f"need {lo} tokens") as info:
        assemble(tok, frame, hay, needles, [0.5], lo - 1, label="passkey")
    assert "passkey" in str(info.value) and str(lo - 1) in str(info.value) and tok.name in str(info.value)


@needs_hf
def test_bos_counts_in_raw_mode_only():
    tok = get_tokenizer("bpe_chat")
    hay = noise_haystack()
    raw = assemble(tok, render_frame(tok, "raw", USER, PREFIX), hay, needles_for(hay, 1), [0.5], 500)
    chat = assemble(tok, render_frame(tok, "chat", USER, PREFIX), hay, needles_for(hay, 1), [0.5], 500)
    bos = tok.hf.bos_token_id
    assert raw.ids[0] == bos and raw.ids.count(bos) == 1
    assert chat.ids[0] == bos and chat.ids.count(bos) == 1  # from the template text, not added again
    assert chat.text.startswith("<|begin_of_text|><|start_header_id|>user")
    assert chat.text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\nThe pass key is")


def test_render_frame_errors():
    with pytest.raises(UsageError, match="no chat template"):
        render_frame(ByteTokenizer(), "chat", USER, PREFIX)
    with pytest.raises(UsageError, match="prompt_mode"):
        render_frame(ByteTokenizer(), "completion", USER, PREFIX)
    with pytest.raises(ValueError):
        render_frame(ByteTokenizer(), "raw", "no sentinel", PREFIX)
    frame = render_frame(ByteTokenizer(), "raw", USER, PREFIX)
    assert frame.pre == "Read this.\n\n" and frame.post == "\n\nWhat is the pass key?" + PREFIX
    assert frame.add_special_tokens
    chat = render_frame(ByteTokenizer(chat=True), "chat", USER, PREFIX)
    assert not chat.add_special_tokens and chat.post.endswith("<|assistant|>\nThe pass key is")


def test_depth_validation():
    tok, hay = ByteTokenizer(), noise_haystack()
    frame = render_frame(tok, "raw", USER, PREFIX)
    with pytest.raises(ValueError):
        assemble(tok, frame, hay, needles_for(hay, 1), [1.5], 1000)
    with pytest.raises(ValueError):
        assemble(tok, frame, hay, needles_for(hay, 2), [0.8, 0.2], 1000)


@needs_hf
def test_stream_is_tokenized_once_and_grows_by_doubling(monkeypatch):
    calls: list[int] = []
    orig = Haystack._tokenize

    def counting(self, tokenizer, copies):
        calls.append(copies)
        return orig(self, tokenizer, copies)

    monkeypatch.setattr(Haystack, "_tokenize", counting)
    tok = get_tokenizer("bpe_llama3")
    hay = Haystack("fresh-noise", NOISE_SENTENCE + "\n", unit="line")
    frame = render_frame(tok, "raw", USER, PREFIX)
    needles = needles_for(hay, 1)
    assemble(tok, frame, hay, needles, [0.5], 20000)
    n = len(calls)
    for length, depth in ((20000, 0.1), (15000, 1.0), (3000, 0.0), (19000, 0.6)):
        assemble(tok, frame, hay, needles, [depth], length)
    assert len(calls) == n  # shorter builds reuse the cached stream
    assemble(tok, frame, hay, needles, [0.5], 60000)
    assert len(calls) == n + 1 and calls[-1] >= 2 * calls[-2]
    assert len(hay.stream(tok, 0)) >= 60000


@needs_hf
def test_one_full_tokenization_per_warm_build():
    tok = get_tokenizer("sp_llama2")
    big: list[int] = []

    class Spy:
        def __getattr__(self, item):
            return getattr(tok, item)

        def encode_with_offsets(self, text, add_special_tokens=False, special_spans=None):
            big.append(len(text))
            return tok.encode_with_offsets(text, add_special_tokens, special_spans)

    spy = Spy()
    hay = essay_haystack()
    frame = render_frame(spy, "raw", USER, PREFIX)
    assemble(spy, frame, hay, needles_for(hay, 1), [0.5], 8000)  # warms the stream and the calibration
    big.clear()
    asm = assemble(spy, frame, hay, needles_for(hay, 1), [0.3], 7000)
    assert big == [len(asm.text)]


class LongTextTokenizer(ByteTokenizer):
    """A tokenizer with a non-local quirk: texts over 5000 characters get one extra id at the end.

    The seam estimate cannot see it (it re-tokenizes short pieces), so the verification must catch it and the
    correction must be remembered for the next build of the same frame.
    """

    def __init__(self) -> None:
        super().__init__()
        self.name = "long-text-quirk"

    def fingerprint(self) -> str:
        return "long-text-quirk"

    def encode(self, text, add_special_tokens=False, special_spans=None):
        ids = super().encode(text, add_special_tokens)
        return ids + [2] if len(text) > 5000 else ids

    def encode_with_offsets(self, text, add_special_tokens=False, special_spans=None):
        ids, offsets = super().encode_with_offsets(text, add_special_tokens)
        if len(text) > 5000:
            return ids + [2], offsets + [(len(text), len(text))]
        return ids, offsets


def test_non_local_seams_are_corrected_and_remembered():
    tok, hay = LongTextTokenizer(), noise_haystack()
    frame = render_frame(tok, "raw", USER, PREFIX)
    first = assemble(tok, frame, hay, needles_for(hay, 1), [0.4], 9000)
    assert len(first.ids) == 9000 and first.verifications == 2  # estimate off by one, then fixed
    second = assemble(tok, frame, hay, needles_for(hay, 1), [0.7], 12000)
    assert len(second.ids) == 12000 and second.verifications == 1  # the learnt correction applies


def test_template_spans_cover_what_the_chat_template_wrote():
    tok = ByteTokenizer(chat=True)
    frame = render_frame(tok, "chat", USER, PREFIX)
    head, question = USER.split(SENTINEL)
    assert frame.pre[:frame.pre_template] == "<|user|>\n" and frame.pre[frame.pre_template:] == head
    a, b = frame.post_template
    assert frame.post[:a] == question and frame.post[a:b] == "\n<|assistant|>\n"
    assert frame.post[b:] == PREFIX.lstrip()  # the answer prefix is text
    assert render_frame(tok, "raw", USER, PREFIX).spans("pre") == []

    class Rewriting(ByteTokenizer):  # a template that changes the user text (here: collapses blank lines)
        def apply_chat_template(self, messages):
            return super().apply_chat_template([{**m, "content": m["content"].replace("\n\n", "\n")}
                                                for m in messages])

    frame = render_frame(Rewriting(chat=True), "chat", USER, PREFIX)
    assert frame.pre_template == len(frame.pre)  # cannot tell the user text apart: all of it counts as template
    assert frame.post_template == (0, len(frame.post) - len(PREFIX.lstrip()))
