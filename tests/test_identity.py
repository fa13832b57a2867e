"""The run identity: what the model and tokenizer directories hold, not only their names (issue 10, kind 6)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from evalctx.models import fingerprint
from evalctx.models.fingerprint import changed_files, folder_files, model_fingerprint

TINY = Path(__file__).resolve().parent.parent / "evalctx" / "data" / "models" / "tiny"


def test_small_files_are_hashed_large_ones_named_by_size_and_mtime(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "config.json").write_text('{"a": 1}')
    (tmp_path / "model.safetensors").write_bytes(b"x" * 100)
    (tmp_path / "README.md").write_text("not a model file")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "x.json").write_text("{}")
    files = folder_files(tmp_path)
    assert set(files) == {"config.json", "model.safetensors"} and files["config.json"].startswith("sha1:")
    monkeypatch.setattr(fingerprint, "HASHED_UP_TO", 50)
    big = folder_files(tmp_path)["model.safetensors"]
    assert big.startswith("size:100,mtime_ns:")
    os.utime(tmp_path / "model.safetensors", ns=(1, 1))  # replaced weights of the same size
    assert folder_files(tmp_path)["model.safetensors"] != big


def test_model_fingerprint_of_paths_names_and_servers(tmp_path: Path) -> None:
    shutil.copytree(TINY, tmp_path / "t")
    by_name, by_path = model_fingerprint("tiny"), model_fingerprint(str(tmp_path / "t"))
    assert by_name["digest"] == by_path["digest"]  # content, not location: a copy is the same model
    assert model_fingerprint("meta-llama/Llama-3.1-8B-Instruct") is None  # a server's model name
    assert model_fingerprint(None) is None
    cfg = tmp_path / "t" / "config.json"
    cfg.write_text(cfg.read_text().replace('"rope_scaling": null', '"rope_scaling": {"factor": 4.0}'))
    changed = model_fingerprint(str(tmp_path / "t"))
    assert changed["digest"] != by_path["digest"]
    assert changed_files(by_path["files"], changed["files"]) == ["config.json"]


def test_the_tokenizer_fingerprint_covers_the_chat_template(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from evalctx.models.tokenizer import HFTokenizer

    shutil.copytree(TINY, tmp_path / "t")
    before = HFTokenizer(tmp_path / "t").fingerprint()
    template = tmp_path / "t" / "chat_template.jinja"
    template.write_text(template.read_text().replace("<|assistant|>", "<|assistant|> "))
    assert HFTokenizer(tmp_path / "t").fingerprint() != before
