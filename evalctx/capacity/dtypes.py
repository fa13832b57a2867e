"""Dtype names as users type them: every standard spelling maps to one short canonical name.

PyTorch and Hugging Face write ``float16``/``torch.float16``/``half``, TensorRT-LLM's ``convert_checkpoint.py
--dtype`` takes ``float16``/``bfloat16``/``float32`` and its ``--kv_cache_dtype``/``quantize.py`` take ``fp8``/
``int8``, and people write ``fp16``/``bf16``. evalctx takes all of them wherever it takes a dtype (``evalctx plan
--weight-dtype/--kv-dtype``, the hf backend's ``dtype`` option) and works with the short names inside.
"""

from __future__ import annotations

from evalctx.errors import UsageError

_SPELLINGS: dict[str, tuple[str, ...]] = {
    "fp32": ("fp32", "float32", "float", "f32", "single"),
    "fp16": ("fp16", "float16", "half", "f16"),
    "bf16": ("bf16", "bfloat16"),
    "fp8": ("fp8", "float8", "e4m3", "fp8_e4m3", "float8_e4m3fn"),
    "int8": ("int8", "i8"),
    "int4": ("int4", "i4"),
}
_CANONICAL = {alias: short for short, aliases in _SPELLINGS.items() for alias in aliases}

TORCH_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
"""Short name -> the ``torch`` attribute name, for the dtypes torch computes in."""


def canonical_dtype(name: object, allowed: tuple[str, ...] | None = None, what: str = "dtype") -> str:
    """The short name (``fp16``, ``bf16``, ``fp32``, ``fp8``, ``int8``, ``int4``) of any standard spelling.

    Case and a ``torch.`` prefix are ignored (``torch.float16``, ``Float16``). Raises UsageError naming the
    accepted spellings when ``name`` is unknown or its canonical name is not in ``allowed``.
    """
    key = str(name).strip().lower().removeprefix("torch.")
    short = _CANONICAL.get(key)
    choices = allowed or tuple(_SPELLINGS)
    if short is None or short not in choices:
        spelled = "; ".join(f"{c} ({', '.join(a for a in _SPELLINGS[c] if a != c)})" for c in choices)
        raise UsageError(f"unknown {what} {name!r}: choose one of {spelled}")
    return short


def torch_dtype_name(name: object, what: str = "dtype") -> str:
    """The ``torch`` attribute name (``float16``, ``bfloat16``, ``float32``) of any spelling of a compute dtype."""
    return TORCH_NAMES[canonical_dtype(name, tuple(TORCH_NAMES), what)]
