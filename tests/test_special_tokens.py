"""Special tokens across tokenizer families: only the leading ones a model expects, never one after the answer
prefix, and special-token strings inside filler, needles and questions stay text (issue 10, kind 1)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizer_fixtures import CHAT_TOKENIZER_NAMES, HAVE_HF, HF_KINDS, TOKENIZER_NAMES, get_tokenizer

from evalctx.tasks import get_task

needs_hf = pytest.mark.skipif(not HAVE_HF, reason="needs tokenizers and transformers")
MARKERS = ["<s>", "</s>", "<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>",
           "<|eot_id|>", "<|start_header_id|>", "[CLS]", "[SEP]", "[MASK]", "[INST]", "<|user|>"]
"""Special-token strings of every fixture family (and other common ones), as an essay might quote them."""
CASES = [(t, m) for t in TOKENIZER_NAMES for m in ("raw", "chat") if m == "raw" or t in CHAT_TOKENIZER_NAMES]


def _special_ids(tok) -> set[int]:
    """Special ids a text can only become by being parsed as a special token (<unk> is also what a vocabulary
    without ``<`` makes of plain characters, so it does not count)."""
    hf = getattr(tok, "hf", None)
    if hf is None:
        return {tok.BOS, tok.EOS, tok.PAD}
    return {i for i, t in hf.added_tokens_decoder.items() if t.special} - {hf.unk_token_id}


@pytest.fixture(scope="module")
def marked_essays(tmp_path_factory):
    folder = tmp_path_factory.mktemp("marked")
    sentences = [f"The manual quotes the marker {m} in its own words. Nobody reads it aloud." for m in MARKERS]
    (folder / "a.txt").write_text(" ".join(sentences * 3) + " The story ends here.")
    return folder


@pytest.mark.parametrize("tok_name,mode", CASES)
def test_specials_only_where_the_template_put_them(tok_name, mode, marked_essays):
    tok = get_tokenizer(tok_name)
    specials = _special_ids(tok)
    lead = list(getattr(tok, "leading_special_ids", [tok.BOS] if tok_name.startswith("byte") else []))
    for task_name in ("passkey", "niah_single"):
        task = get_task(task_name)(tok, {"haystack": "essay", "haystack_dir": str(marked_essays)}, mode)
        s = task.make_sample(task.min_length() + 700, 0.5, 3)
        assert any(m in s.prompt for m in MARKERS)  # the essay's markers are in the prompt, as text
        assert s.prompt_ids == tok.encode(s.prompt, s.add_special_tokens, s.special_spans)
        _, offsets = tok.encode_with_offsets(s.prompt, s.add_special_tokens, s.special_spans)
        for i, t in enumerate(s.prompt_ids):
            if t not in specials:
                continue
            if mode == "raw":
                assert i < len(lead) and s.prompt_ids[:len(lead)] == lead  # leading specials only
            else:
                a, b = offsets[i]
                assert any(x <= a < y or x < b <= y for x, y in s.special_spans), (i, t, s.prompt[a:b])
        assert s.prompt_ids[-1] not in specials  # nothing after the answer prefix: no EOS, no [SEP]
        if mode == "raw":
            assert s.special_spans == []
            assert s.prompt_ids == lead + tok.encode(s.prompt, False, ())


@needs_hf
@pytest.mark.parametrize("name", HF_KINDS)
def test_leading_specials_only(name):
    tok = get_tokenizer(name)
    full = tok._rust.encode("The pass key is", add_special_tokens=True).ids  # what the files say
    bare = tok.encode("The pass key is")
    got = tok.encode("The pass key is", add_special_tokens=True)
    assert got == tok.leading_special_ids + bare and full[:len(got)] == got
    trailing = len(full) - len(got)
    assert trailing == (1 if name in ("unigram_llama", "wordpiece") else 0)  # appended </s> / [SEP] are dropped


@needs_hf
@pytest.mark.parametrize("name", HF_KINDS)
def test_a_special_string_is_text_unless_in_a_template_span(name):
    tok = get_tokenizer(name)
    specials = _special_ids(tok)
    marker = next(tok.hf.convert_ids_to_tokens(i) for i in sorted(specials))
    text = f"before {marker} after"
    assert specials & set(tok.encode(text))  # the tokenizer's own behaviour: parsed anywhere
    assert not specials & set(tok.encode(text, special_spans=()))
    if name.startswith(("bpe", "sp_")):  # byte-level or byte fallback: the characters come back as they were
        assert tok.decode(tok.encode(text, special_spans=())) == text
    at = text.index(marker)
    kept = tok.encode(text, special_spans=[(at, at + len(marker))])
    assert kept == tok.encode(text)  # inside a span it is the special token again


@st.composite
def chat_texts(draw):
    name = draw(st.sampled_from([n for n in CHAT_TOKENIZER_NAMES if n != "byte-chat"]))
    words = st.sampled_from(["The", " pass", " key", " is", " 12345", ".", "\n", "\n\n", " ", "  ", "Remember",
                             " it", "?", "é", "ß", "日本"])
    content = draw(st.lists(words, min_size=1, max_size=30).map("".join))
    question = draw(st.lists(words, max_size=8).map("".join))
    return name, content, question


@needs_hf
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chat_texts())
def test_retokenizing_between_template_specials_reproduces_one_pass(case):
    """The slow path (stretches between kept special tokens tokenized on their own, behind a marker) must give
    exactly what one pass gives when the stretches hold no special-token string."""
    name, content, question = case
    tok = get_tokenizer(name)
    text = tok.apply_chat_template([{"role": "user", "content": content + question}]) + "The pass key is"
    enc = tok._rust.encode(text, add_special_tokens=False)
    specials = _special_ids(tok)
    every = [k for k, t in enumerate(enc.ids) if t in specials]
    ids, offsets = tok._retokenize_between(text, enc.ids, enc.offsets, every)
    assert ids == enc.ids and offsets == [tuple(o) for o in enc.offsets]
