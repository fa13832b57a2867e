"""The hf backend's checks before any generation: dtype spellings, model limits, the tokenizer against the model."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from evalctx.backends.base import BackendContext, parse_options  # noqa: E402
from evalctx.backends.hf import HFBackend  # noqa: E402
from evalctx.tokenizer import ByteTokenizer  # noqa: E402


@pytest.fixture(scope="module")
def byte_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Llama over the byte tokenizer's vocabulary, no tokenizer files of its own."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=ByteTokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                   max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    path = tmp_path_factory.mktemp("byte_llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def make_backend(path: Path | str, tokenizer=None, **opts: object) -> HFBackend:
    options = parse_options(HFBackend, {"device": "cpu", **opts})
    return HFBackend(options, BackendContext(model=str(path), tokenizer=tokenizer or ByteTokenizer()))


def test_dtype_in_any_spelling(byte_llama: Path) -> None:
    assert make_backend(byte_llama, dtype="fp32").dtype == torch.float32
    assert make_backend(byte_llama, dtype="torch.float32").dtype == torch.float32
    assert make_backend(byte_llama, dtype="bf16").dtype == torch.bfloat16
