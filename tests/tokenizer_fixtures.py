"""Real Hugging Face tokenizers built locally (no downloads) for the task-generator tests and the benchmark.

Each is trained with the ``tokenizers`` library on the noise and essay haystacks themselves, so its merges cross
sentence seams the way a real tokenizer's would, wrapped in ``PreTrainedTokenizerFast``, saved to a temporary
folder and loaded back through :class:`evalctx.models.tokenizer.HFTokenizer` exactly as a user's tokenizer would be.
Built once per process (module-level cache).
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

from evalctx.tasks.haystack import DEFAULT_ESSAY_DIR, NOISE_SENTENCE
from evalctx.models.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

# Llama-3's pre-tokenizer regex (tiktoken cl100k style).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

HAVE_HF = all(importlib.util.find_spec(m) is not None for m in ("tokenizers", "transformers"))
"""The real-tokenizer cases need ``tokenizers`` and ``transformers`` (extra ``tokenizers``); without them they skip."""
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""SmolLM2/Qwen-style ChatML, no BOS."""

LLAMA2_TEMPLATE = ("{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] | trim }} [/INST]{% endfor %}")
"""Llama-2-chat's shape: BOS as text, the user turn in [INST] ... [/INST]."""
BERT_TEMPLATE = ("{% for m in messages %}{{ cls_token }} {{ m['content'] }} {{ sep_token }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ cls_token }} {% endif %}")
"""A template whose markers are WordPiece's [CLS]/[SEP] specials."""

HF_KINDS = ("bpe_llama3", "sp_llama2", "bpe_digits", "bpe_chat", "bpe_gpt2", "unigram_llama",
            "wordpiece") if HAVE_HF else ()
"""byte-level BPE without BOS; sentencepiece-style BPE (byte fallback, BOS); digits split one by one; chat;
GPT-2 pre-tokenizer with newline-run merges and ChatML (like SmolLM2); SentencePiece Unigram with Metaspace
(prepend_scheme "first"), a ``<s> $A </s>`` post-processor and ``add_eos_token`` (a Llama tokenizer that appends EOS)
and a Llama-2 chat template; BERT-style uncased WordPiece whose post-processor wraps the text in [CLS] ... [SEP]."""

_ROOT: Path | None = None
_CACHE: dict[str, Tokenizer] = {}


def training_text() -> list[str]:
    """A few tens of KB: noise lines and the shipped essays, in chunks that keep their line breaks and numbers."""
    essays = [p.read_text() for p in sorted(DEFAULT_ESSAY_DIR.glob("*.txt"))]
    noise = "\n".join([NOISE_SENTENCE] * 40) + "\n"
    extra = ("The pass key is 01234. Remember it. 01234 is the pass key.\nWhat is the pass key? "
             "One of the special magic numbers for quiet-harbor is: 9876543. 5678 4321 0 1 2 3 4 5 6 7 8 9\n")
    return [noise, extra * 5, *essays]


def newline_text() -> list[str]:
    r"""Prose joined by newline runs and sentence joins ("\n\n", "\n\n\n", ". \n") plus prompts shaped like the tasks'.

    Trained on this, newline runs become single tokens as in GPT-2-style vocabularies (GPT-2, SmolLM2, StarCoder).
    GPT-2's pre-tokenizer (``\s+(?!\S)``) splits a run before a non-space ("\n\n." is "\n", "\n", ".") but not
    before a space ("\n\n The" is "\n\n", " The"), so the seam between a template that ends in "\n\n" and the
    haystack costs one token more or less depending on the haystack's first character.
    """
    sentences = []
    for p in sorted(DEFAULT_ESSAY_DIR.glob("*.txt")):
        sentences += [s.strip() for s in p.read_text().replace("\n", " ").split(". ") if s.strip()]
    joins = ["\n\n", "\n\n\n", ". \n", ".\n\n", "\n", ". \n\n", ".\n\n\n\n"]
    prose = "".join(s + joins[i % len(joins)] for i, s in enumerate(sentences))
    noise = "\n".join([NOISE_SENTENCE] * 12)
    doc = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz "
           f"you about the important information.\n\n{noise}\nThe pass key is 12345. Remember it. 12345 is the "
           f"pass key.\n\n\nWhat is the pass key?\n\nThe pass key is 12345.\n\n\n\n")
    return [prose, *[doc] * 10]


def _root() -> Path:
    global _ROOT
    if _ROOT is None:
        _ROOT = Path(tempfile.mkdtemp(prefix="evalctx-tok-"))
        atexit.register(shutil.rmtree, _ROOT, True)
    return _ROOT


def _bytelevel_bpe(vocab_size: int, digits: bool, specials: list[str]):
    from tokenizers import Regex, Tokenizer as RustTokenizer, decoders, models, pre_tokenizers, trainers

    tok = RustTokenizer(models.BPE())
    if digits:  # Llama-1/Mistral style: every digit its own token
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    return tok, trainer


def build_rust(kind: str, text: list[str] | None = None, vocab_size: int = 2000):
    """The ``tokenizers.Tokenizer`` of one kind (see :data:`HF_KINDS`) and its special tokens."""
    from tokenizers import Tokenizer as RustTokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import trainers

    text = text or training_text()
    if kind in ("bpe_llama3", "bpe_digits"):
        tok, trainer = _bytelevel_bpe(vocab_size, kind == "bpe_digits", ["<|endoftext|>"])
        tok.train_from_iterator(text, trainer)
        return tok, {"eos_token": "<|endoftext|>"}
    if kind == "bpe_prefix_space":
        # ByteLevel with add_prefix_space (RoBERTa/BART style): every encode starts with a space. Not in HF_KINDS
        # (the property sweeps); test_placement builds lengths that once needed more than 5 verifications.
        tok = RustTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(text, trainer)
        tok.post_processor = processors.ByteLevel(trim_offsets=True)
        return tok, {"eos_token": "<|im_end|>", "bos_token": "<|endoftext|>"}
    if kind == "bpe_gpt2":
        # GPT-2's own pre-tokenizer: ByteLevel with its regex (`` ?\p{L}+``, ``\s+(?!\S)``, ``\s+`` ...).
        tok = RustTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(text + newline_text(), trainer)
        return tok, {"eos_token": "<|im_end|>", "bos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    if kind == "bpe_chat":
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
        tok, trainer = _bytelevel_bpe(vocab_size, False, specials)
        tok.train_from_iterator(text, trainer)
        # Like Llama-3: raw encodes get BOS from the post-processor; chat text carries it itself.
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
            special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])
        return tok, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    if kind == "sp_llama2":
        # Train on Metaspace words (merges stay inside words, as sentencepiece's), then run it the way Llama-2's
        # tokenizer.json does: no pre-tokenizer, a normalizer that prepends "▁" and maps spaces, byte fallback.
        tmp = RustTokenizer(models.BPE(unk_token="<unk>"))
        tmp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                      show_progress=False)
        tmp.train_from_iterator(text, trainer)
        model = json.loads(tmp.to_str())["model"]
        vocab: dict[str, int] = {"<unk>": 0, "<s>": 1, "</s>": 2}
        for b in range(256):
            vocab[f"<0x{b:02X}>"] = len(vocab)
        for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]):
            vocab.setdefault(t, len(vocab))
        merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
        tok = RustTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True,
                                       fuse_unk=True))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
        tok.add_special_tokens(["<unk>", "<s>", "</s>"])
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
        return tok, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if kind == "unigram_llama":
        tok = RustTokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                          unk_token="<unk>", show_progress=False)
        tok.train_from_iterator(text, trainer)
        bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> <s> $B </s>",
                                                           special_tokens=[("<s>", bos), ("</s>", eos)])
        return tok, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if kind == "wordpiece":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok = RustTokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
        tok.train_from_iterator(text, trainer)
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                           special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
        return tok, {"cls_token": "[CLS]", "sep_token": "[SEP]", "unk_token": "[UNK]", "pad_token": "[PAD]",
                     "mask_token": "[MASK]", "eos_token": "[SEP]"}
    raise ValueError(f"unknown tokenizer kind {kind!r}")


def save_hf(kind: str, folder: Path, text: list[str] | None = None, vocab_size: int = 2000) -> Path:
    """Build one kind and save it as a Hugging Face tokenizer folder (tokenizer.json + config)."""
    from transformers import PreTrainedTokenizerFast

    rust, specials = build_rust(kind, text, vocab_size)
    fast = PreTrainedTokenizerFast(tokenizer_object=rust, **specials)
    if kind == "bpe_chat":
        fast.chat_template = CHAT_TEMPLATE
    if kind == "bpe_gpt2":
        fast.chat_template = CHATML_TEMPLATE
    if kind == "unigram_llama":
        fast.chat_template = LLAMA2_TEMPLATE
    if kind == "wordpiece":
        fast.chat_template = BERT_TEMPLATE
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(folder))
    if kind == "unigram_llama":  # as a Llama tokenizer that appends EOS states it (the post-processor does it)
        cfg_path = folder / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.update(add_bos_token=True, add_eos_token=True)
        cfg_path.write_text(json.dumps(cfg, indent=2))
    return folder


def hf_tokenizer(kind: str) -> Tokenizer:
    """The cached :class:`HFTokenizer` of one kind, built on first use."""
    if kind not in _CACHE:
        _CACHE[kind] = HFTokenizer(save_hf(kind, _root() / kind))
    return _CACHE[kind]


def get_tokenizer(name: str) -> Tokenizer:
    if name == "byte":
        return ByteTokenizer()
    if name == "byte-chat":
        return ByteTokenizer(chat=True)
    return hf_tokenizer(name)


TOKENIZER_NAMES = ("byte", "byte-chat", *HF_KINDS)
CHAT_TOKENIZER_NAMES = ("byte-chat", "bpe_chat", "bpe_gpt2", "unigram_llama", "wordpiece") if HAVE_HF else (
    "byte-chat",)
