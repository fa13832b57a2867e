"""Tokenizer adapters: any Hugging Face tokenizer directory (offline), and a byte tokenizer for tests.

Generators need three things from a tokenizer: ids with character offsets (to splice in token space and map
sentence boundaries), whether it adds special tokens (BOS counts toward the exact length), and its chat template.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

from evalctx.errors import UsageError, require_extra

Offsets = list[tuple[int, int]]


@runtime_checkable
class Tokenizer(Protocol):
    name: str
    eos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...

    def encode_with_offsets(self, text: str, add_special_tokens: bool = False) -> tuple[list[int], Offsets]:
        """Ids and (start, end) character offsets into ``text``; special tokens get (0, 0)."""
        ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def fingerprint(self) -> str:
        """Short stable hash: two tokenizers with the same fingerprint tokenize identically."""
        ...

    def has_chat_template(self) -> bool: ...

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        """Render ``messages`` with the generation prompt added, as text (special tokens included as text)."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as tokens (id = byte + 3); BOS=1 added with special tokens. Deterministic and dependency-free.

    ``chat=True`` gives it a minimal chat template so chat-mode code paths can be tested without a model hub.
    """

    PAD, BOS, EOS = 0, 1, 2
    OFFSET = 3
    vocab_size = 256 + OFFSET

    def __init__(self, chat: bool = False) -> None:
        self.chat = chat
        self.name = "byte-chat" if chat else "byte"
        self.eos_token_id = self.EOS

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = [b + self.OFFSET for b in text.encode("utf-8")]
        return [self.BOS, *ids] if add_special_tokens else ids

    def encode_with_offsets(self, text: str, add_special_tokens: bool = False) -> tuple[list[int], Offsets]:
        ids: list[int] = [self.BOS] if add_special_tokens else []
        offsets: Offsets = [(0, 0)] if add_special_tokens else []
        if text.isascii():
            ids.extend(b + self.OFFSET for b in text.encode("ascii"))
            offsets.extend((i, i + 1) for i in range(len(text)))
            return ids, offsets
        for i, ch in enumerate(text):
            for b in ch.encode("utf-8"):
                ids.append(b + self.OFFSET)
                offsets.append((i, i + 1))
        return ids, offsets

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(i - self.OFFSET for i in ids if i >= self.OFFSET)
        return data.decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        return self.name

    def has_chat_template(self) -> bool:
        return self.chat

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        if not self.chat:
            raise UsageError("tokenizer 'byte' has no chat template: use --prompt-mode raw or tokenizer 'byte-chat'")
        parts = [f"<|{m['role']}|>\n{m['content']}\n" for m in messages]
        return "".join(parts) + "<|assistant|>\n"


class HFTokenizer:
    """A Hugging Face tokenizer loaded offline from a directory; uses the Rust tokenizer for speed and offsets."""

    def __init__(self, path: str | os.PathLike[str], gguf_file: str | None = None) -> None:
        require_extra("transformers", "hf")
        from transformers import AutoTokenizer

        self.path = Path(path)
        if not self.path.is_dir():
            raise UsageError(f"tokenizer directory not found: {self.path} (pass --tokenizer DIR with tokenizer files)")
        kwargs = {"local_files_only": True}
        if gguf_file:
            kwargs["gguf_file"] = gguf_file
        try:
            self.hf = AutoTokenizer.from_pretrained(str(self.path), **kwargs)
        except Exception as exc:  # transformers raises many types; the user needs one line
            raise UsageError(f"cannot load a tokenizer from {self.path}: {type(exc).__name__}: {exc}") from exc
        if not getattr(self.hf, "is_fast", False):
            raise UsageError(
                f"tokenizer in {self.path} has no fast (Rust) version; evalctx needs token offsets: "
                "save it with a tokenizer.json (PreTrainedTokenizerFast)"
            )
        # A tokenizer.json may carry truncation/padding settings: they would cut prompts silently. Never.
        self._rust = self.hf.backend_tokenizer
        self._rust.no_truncation()
        self._rust.no_padding()
        self.name = str(self.path)
        self.eos_token_id = self.hf.eos_token_id
        self._gguf_file = gguf_file

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._rust.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_with_offsets(self, text: str, add_special_tokens: bool = False) -> tuple[list[int], Offsets]:
        enc = self._rust.encode(text, add_special_tokens=add_special_tokens)
        return enc.ids, enc.offsets

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True)

    def fingerprint(self) -> str:
        h = hashlib.sha1()
        names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
        for name in names:
            p = self.path / name
            if p.is_file():
                h.update(name.encode())
                h.update(p.read_bytes())
        if self._gguf_file:
            h.update(self._gguf_file.encode())
            h.update(str((self.path / self._gguf_file).stat().st_size).encode())
        return h.hexdigest()[:16]

    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        if not self.has_chat_template():
            raise UsageError(f"tokenizer {self.path} has no chat template: use prompt_mode = \"raw\"")
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def load_tokenizer(spec: str | os.PathLike[str]) -> Tokenizer:
    """``byte``, ``byte-chat``, an embedded model name (``tiny``, ``smollm2``) or a tokenizer directory."""
    s = str(spec)
    if s == "byte":
        return ByteTokenizer()
    if s == "byte-chat":
        return ByteTokenizer(chat=True)
    from evalctx.models import resolve_model

    resolved = resolve_model(s)
    return HFTokenizer(resolved.path, gguf_file=resolved.gguf_file)
