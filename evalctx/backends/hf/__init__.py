"""The Hugging Face transformers backend (``--backend hf``); heavy imports happen inside its modules' functions."""

from evalctx.backends.hf.attention import LOWER_RIGHT_SDPA, auto_attention, register_lower_right_sdpa
from evalctx.backends.hf.backend import HFBackend

__all__ = ["HFBackend", "LOWER_RIGHT_SDPA", "auto_attention", "register_lower_right_sdpa"]
