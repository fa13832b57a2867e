"""Does this tokenizer fit this model? Checked before any generation, so a mismatch is one line and exit 2.

A tokenizer that is not the model's gives tracebacks (ids beyond the embedding table) or, worse, a silent 0%
(ids in range that mean other text: a BPE trained on other text, the byte tokenizer against a real vocabulary).
What can be checked without running the model:

* when the model directory has its own tokenizer files, the given tokenizer must tokenize a probe text (task
  wording, digits, punctuation, non-ASCII) to the same ids, leading special tokens included;
* every id a prompt can hold (the text vocabulary, the leading specials, the chat template's specials) and the EOS
  id must lie inside the model's embedding table.
"""

from __future__ import annotations

import sys
from pathlib import Path

from evalctx.errors import UsageError
from evalctx.models.tokenizer import Tokenizer

PROBE = ("There is an important info hidden inside a lot of irrelevant text. The pass key is 40213. Remember it. "
         "One of the special magic numbers for quiet-harbor is: 9876543.\n\nWhat is the pass key? "
         "Café, naïve, 日本語 -- (x) [y] {z} 3.14% #1 @home\tend.")


def prompt_ids_of(tokenizer: Tokenizer) -> list[int]:
    """The ids a prompt can hold apart from text: leading specials and the chat template's own tokens."""
    ids = tokenizer.encode("", add_special_tokens=True)
    if tokenizer.has_chat_template():
        try:
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": "x"}])
        except Exception:  # a template that needs more (a system turn...): render_frame reports it when used
            rendered = ""
        ids += tokenizer.encode(rendered, special_spans=[(0, len(rendered))])
    return ids


def check_tokenizer(tokenizer: Tokenizer, model: str, embedding_rows: int | None,
                    own: Tokenizer | None = None, own_spec: str | None = None) -> None:
    """Raise UsageError naming the tokenizer to pass when ``tokenizer`` cannot be ``model``'s.

    ``embedding_rows``: rows of the model's input embedding table (None: unknown). ``own``: the tokenizer the
    model directory ships (None: it ships none), ``own_spec`` what to pass to get it.
    """
    # Naming the model's own tokenizer only where the model directory ships one.
    hint = f"pass --tokenizer {own_spec} (or leave --tokenizer out)" if own is not None and own_spec else \
        "pass the tokenizer the model was trained with (--tokenizer DIR)"
    if own is not None and own.fingerprint() != tokenizer.fingerprint():
        given, wanted = tokenizer.encode(PROBE, add_special_tokens=True), own.encode(PROBE, add_special_tokens=True)
        if given != wanted:
            at = next((i for i, (a, b) in enumerate(zip(given, wanted)) if a != b), min(len(given), len(wanted)))
            raise UsageError(
                f"tokenizer {tokenizer.name} does not tokenize like the one {model} ships ({len(given)} vs "
                f"{len(wanted)} tokens for a probe text, first difference at token {at}): {hint}")
    if embedding_rows is None:
        return
    text_vocab = _text_vocab_size(tokenizer)
    if text_vocab is not None and text_vocab > embedding_rows:
        raise UsageError(f"tokenizer {tokenizer.name} has {text_vocab} text tokens but {model}'s embedding table "
                         f"has {embedding_rows} rows: ids beyond it cannot run; {hint}")
    if text_vocab is not None and own is None and 2 * text_vocab < embedding_rows:
        # Nothing to compare with; a table padded for speed is a few percent larger, never twice the vocabulary.
        print(f"evalctx: warning: tokenizer {tokenizer.name} has {text_vocab} text tokens but {model}'s embedding "
              f"table has {embedding_rows} rows: it is probably not the model's tokenizer (answers would be other "
              f"text, scored 0); {hint}", file=sys.stderr)
    eos = getattr(tokenizer, "eos_token_id", None)
    beyond = sorted({i for i in prompt_ids_of(tokenizer) + ([eos] if isinstance(eos, int) else [])
                     if i >= embedding_rows})
    if beyond:
        raise UsageError(f"tokenizer {tokenizer.name}'s special token id(s) {beyond} lie beyond {model}'s "
                         f"{embedding_rows}-row embedding table; {hint}")


def _text_vocab_size(tokenizer: Tokenizer) -> int | None:
    """Ids plain text can become: the vocabulary without added tokens (which need not all be embedded)."""
    size = getattr(tokenizer, "text_vocab_size", None)
    if size is None:
        size = getattr(tokenizer, "vocab_size", None)
    return int(size) if isinstance(size, int) else None


def own_tokenizer(folder: Path, gguf_file: str | None, given: Tokenizer) -> Tokenizer | None:
    """The tokenizer a model directory ships (None: it ships none, or it is ``given`` itself)."""
    if Path(getattr(given, "path", "")) == folder and getattr(given, "_gguf_file", None) == gguf_file:
        return None
    if not gguf_file and not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json",
                                                                   "tokenizer.model")):
        return None
    from evalctx.models.tokenizer import HFTokenizer

    return HFTokenizer(folder, gguf_file=gguf_file)
