"""Helpers for the TensorRT-LLM backend tests: the stand-in package (tests/standin), engine dirs and requests."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from evalctx.records import GenerationRequest
from evalctx.models.tokenizer import ByteTokenizer

STANDIN = Path(__file__).parent / "standin"
ENGINES = Path(__file__).parent / "data" / "engines"


def purge() -> None:
    for name in [n for n in sys.modules if n == "tensorrt_llm" or n.startswith("tensorrt_llm.")]:
        del sys.modules[name]


@pytest.fixture
def standin(monkeypatch):
    """Put the stand-in tensorrt_llm first on sys.path; returns its knobs module (BEHAVIOUR, WORLD, DROPPED)."""
    for var in ("EVALCTX_STANDIN_BEHAVIOUR", "EVALCTX_STANDIN_DROP", "EVALCTX_STANDIN_VERSION", "EVALCTX_STANDIN_LOG",
                "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "PMI_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.syspath_prepend(str(STANDIN))
    purge()
    from tensorrt_llm import _standin

    yield _standin
    purge()


def make_engine(tmp_path: Path, tp: int = 1, pp: int = 1, name: str | None = None, **build: object) -> Path:
    """The v1 test engine's config.json with tp/pp and build keys changed, plus one rank*.engine file per rank."""
    data = json.loads((ENGINES / "v1" / "config.json").read_text())
    data["pretrained_config"]["mapping"].update(tp_size=tp, pp_size=pp, world_size=tp * pp)
    plugin = data["build_config"]["plugin_config"]
    for key, value in build.items():
        (plugin if key in plugin else data["build_config"])[key] = value
    path = tmp_path / (name or f"engine-tp{tp}-pp{pp}")
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(data))
    for rank in range(tp * pp):
        (path / f"rank{rank}.engine").write_bytes(b"")
    return path


def request(sid: str, text: str = "the passkey is", new: int = 8, **extra: object) -> GenerationRequest:
    ids = ByteTokenizer().encode(text, add_special_tokens=True)
    return GenerationRequest(sample_id=sid, prompt_ids=ids, prompt=text, max_new_tokens=new, extra=dict(extra))


class FakeComm:
    """The bits of an mpi4py replica communicator the backend uses, for in-process tests."""

    def __init__(self, size: int, gathered: list | None = None) -> None:
        self.size, self.gathered = size, gathered

    def Get_size(self) -> int:
        return self.size

    def allgather(self, value: object) -> list:
        return self.gathered if self.gathered is not None else [value] * self.size

    def bcast(self, value: object, root: int = 0) -> object:
        return value
