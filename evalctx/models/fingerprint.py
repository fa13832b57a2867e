"""What a model directory holds, as a fingerprint that enters the run identity (config hash) and the manifest.

Resume is keyed by the run identity: a model whose config.json changed in place (a RoPE scaling added, a window
changed) or whose weights were replaced must not resume the old run and report its stale numbers. The fingerprint
names every file that decides the model's behaviour: configs, tokenizer files and templates are hashed; weight
files are hashed when small (up to :data:`HASHED_UP_TO`, e.g. the embedded tiny model) and otherwise named by size
and modification time (hashing tens of GB at every start would cost minutes), so copying a large model without
preserving times makes it a new run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

HASHED_UP_TO = 16 * 1024 * 1024
"""Files up to this many bytes are hashed; larger ones are named by size and mtime."""

CONFIG_SUFFIXES = (".json", ".jinja", ".model", ".txt", ".tiktoken", ".yaml", ".py")
"""Configs, tokenizers (vocab.txt, merges.txt, tokenizer.model), chat templates, remote code."""
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".engine", ".npz", ".msgpack", ".h5")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "vocab.txt", "spiece.model", "sentencepiece.bpe.model")
"""Files that decide how a Hugging Face tokenizer tokenizes and templates."""


def _file_id(path: Path) -> str:
    st = path.stat()
    if st.st_size <= HASHED_UP_TO:
        return "sha1:" + hashlib.sha1(path.read_bytes()).hexdigest()[:16]
    return f"size:{st.st_size},mtime_ns:{st.st_mtime_ns}"


def folder_files(folder: Path, max_depth: int = 2) -> dict[str, str]:
    """``{relative path: "sha1:..." or "size:...,mtime_ns:..."}`` of the model files under ``folder``.

    Hidden files and folders (a hub download's ``.cache``) and other suffixes (README.md) are left out.
    """
    out: dict[str, str] = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or len(rel.parts) > max_depth or not path.is_file():
            continue
        if path.suffix in CONFIG_SUFFIXES or path.suffix in WEIGHT_SUFFIXES:
            out[rel.as_posix()] = _file_id(path)
    return out


def digest(files: dict[str, str]) -> str:
    """A short hash of a :func:`folder_files` mapping."""
    return hashlib.sha1(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]


def model_fingerprint(spec: str | None) -> dict[str, Any] | None:
    """``{"path", "digest", "files"}`` of the local directory ``spec`` names (a path or an embedded model name),
    or None when it names none (an http server's model name): then the name alone is the identity."""
    if not spec:
        return None
    from evalctx.models.embedded import local_model_dir

    folder = local_model_dir(spec)
    if folder is None:
        return None
    files = folder_files(folder)
    return {"path": str(folder), "digest": digest(files), "files": files}


def changed_files(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """Names of files added, removed or changed between two :func:`folder_files` mappings."""
    return sorted(name for name in set(old) | set(new) if old.get(name) != new.get(name))
