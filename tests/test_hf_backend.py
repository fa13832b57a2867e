"""The hf backend on a tiny randomly initialised Llama built here (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from evalctx.backends.base import BackendContext, parse_options  # noqa: E402
from evalctx.backends.hf import HFBackend  # noqa: E402
from evalctx.cli import main  # noqa: E402
from evalctx.records import GenerationRequest  # noqa: E402
from evalctx.tokenizer import ByteTokenizer  # noqa: E402

SUITE = str(Path(__file__).parent / "data" / "suites" / "fake_small.toml")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=ByteTokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                   max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = transformers.LlamaForCausalLM(cfg)
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    return path


def make_backend(path: Path, **opts: object) -> HFBackend:
    options = parse_options(HFBackend, {"device": "cpu", **opts})
    return HFBackend(options, BackendContext(model=str(path), tokenizer=ByteTokenizer()))


def test_chunked_prefill_matches_one_shot(tiny_llama: Path) -> None:
    tok = ByteTokenizer()
    ids = tok.encode("The grass is green. The sky is blue. " * 6, add_special_tokens=True)
    req = [GenerationRequest(sample_id="a", prompt_ids=ids, prompt="", max_new_tokens=8)]
    one = make_backend(tiny_llama, chunk_size=0).generate(req)[0]
    chunked = make_backend(tiny_llama, chunk_size=17).generate(req)[0]
    assert one.error is None and chunked.error is None
    assert one.text == chunked.text
    assert one.n_prompt_tokens == len(ids) == chunked.n_prompt_tokens
    assert 1 <= chunked.n_output_tokens <= 8
    assert chunked.ttft_s is not None and 0 < chunked.ttft_s <= chunked.latency_s


def test_batch_of_equal_lengths_matches_singles(tiny_llama: Path) -> None:
    tok = ByteTokenizer()
    texts = ["The pass key is 12345. " * 3, "The pass key is 67890. " * 3]
    reqs = [GenerationRequest(sample_id=str(i), prompt_ids=tok.encode(t, True), prompt=t, max_new_tokens=5)
            for i, t in enumerate(texts)]
    backend = make_backend(tiny_llama, chunk_size=16)
    batched = backend.generate(reqs)
    singles = [backend.generate([r])[0] for r in reqs]
    assert [b.text for b in batched] == [s.text for s in singles]
    assert all(b.batch_size == 2 for b in batched)


def test_bad_option_values(tiny_llama: Path) -> None:
    from evalctx.errors import UsageError

    with pytest.raises(UsageError, match="dtype"):
        make_backend(tiny_llama, dtype="float8")
    with pytest.raises(UsageError, match="tp"):
        HFBackend.ranks_per_replica(parse_options(HFBackend, {"tp": "2"}), None)


def test_end_to_end_run_with_hf(tiny_llama: Path, tmp_path: Path) -> None:
    code = main(["run", "--suite", SUITE, "--backend", "hf", "--model", str(tiny_llama), "--tokenizer", "byte",
                 "--out", str(tmp_path), "--run-id", "hf", "--no-progress", "--backend-opt", "device=cpu",
                 "--backend-opt", "chunk_size=128", "--lengths", "400", "--samples", "1"])
    assert code == 0
    df = pd.read_parquet(tmp_path / "hf" / "results.parquet")
    assert (df["status"] == "ok").all()
    assert (df["n_prompt_tokens"] == 400).all()
    assert df["latency_s"].gt(0).all() and df["ttft_s"].gt(0).all()
    assert (df["hf_chunk_size"] == 128).all()


def test_lower_right_sdpa_matches_stock_sdpa(tiny_llama: Path) -> None:
    tok = ByteTokenizer()
    ids = tok.encode("The grass is green. The pass key is 31415. The sky is blue. " * 4, add_special_tokens=True)
    req = [GenerationRequest(sample_id="a", prompt_ids=ids, prompt="", max_new_tokens=8)]
    stock = make_backend(tiny_llama, chunk_size=29).generate(req)[0]
    ours = make_backend(tiny_llama, chunk_size=29, attn_implementation="evalctx_sdpa").generate(req)[0]
    assert stock.text == ours.text and stock.n_output_tokens == ours.n_output_tokens


def test_lower_right_sdpa_logits_match(tiny_llama: Path) -> None:
    from transformers import DynamicCache

    from evalctx.backends.hf import register_lower_right_sdpa

    register_lower_right_sdpa()
    ids = torch.randint(3, 200, (1, 50))
    outs = []
    for impl in ("sdpa", "evalctx_sdpa"):
        model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation=impl).eval()
        cache = DynamicCache()
        with torch.inference_mode():
            logits = [model(input_ids=ids[:, i:i + 16], past_key_values=cache, use_cache=True).logits
                      for i in range(0, 50, 16)]
        outs.append(torch.cat(logits, dim=1))
    assert torch.allclose(outs[0], outs[1], atol=1e-5, rtol=1e-4)


def test_auto_attention_picks_lower_right_for_llama_on_cuda(tiny_llama: Path) -> None:
    from evalctx.backends.hf import auto_attention
    from evalctx.models import ResolvedModel

    assert auto_attention(ResolvedModel("t", tiny_llama), on_cuda=True) == "evalctx_sdpa"
    assert auto_attention(ResolvedModel("t", tiny_llama), on_cuda=False) == "sdpa"
    backend = make_backend(tiny_llama)  # cpu
    assert backend.row_columns()["hf_attn_implementation"] == "sdpa"


def test_auto_attention_keeps_sdpa_with_sliding_window(tmp_path: Path) -> None:
    from evalctx.backends.hf import auto_attention
    from evalctx.models import ResolvedModel

    cfg = transformers.MistralConfig(vocab_size=ByteTokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                     sliding_window=16)
    transformers.MistralForCausalLM(cfg).save_pretrained(tmp_path)
    assert auto_attention(ResolvedModel("m", tmp_path), on_cuda=True) == "sdpa"
