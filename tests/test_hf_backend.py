"""The hf backend on a tiny randomly initialised Llama built here (no downloads): chunked prefill, the lower-right
SDPA, the preallocated KV cache, the memory preflight. Tensor parallelism under mpirun: tests/test_hf_tp.py."""

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
from evalctx.models.tokenizer import ByteTokenizer  # noqa: E402

SUITE = str(Path(__file__).parent / "data" / "suites" / "fake_small.toml")


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
    with pytest.raises(UsageError, match="tp must be >= 1"):
        HFBackend.ranks_per_replica(parse_options(HFBackend, {"tp": "0"}), None)
    assert HFBackend.ranks_per_replica(parse_options(HFBackend, {"tp": "2"}), None) == 2
    with pytest.raises(UsageError, match="memory_gb"):
        make_backend(tiny_llama, memory_gb=-1)


def test_tp_without_mpirun_is_a_usage_error(tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["run", "--suite", SUITE, "--backend", "hf", "--model", str(tiny_llama), "--tokenizer", "byte",
                 "--out", str(tmp_path), "--no-progress", "--backend-opt", "tp=2", "--lengths", "400"])
    assert code == 2
    assert "mpirun -n 2" in capsys.readouterr().err


def test_tp_must_divide_the_heads(tiny_llama: Path) -> None:
    from evalctx.backends.hf.parallel import check_divides
    from evalctx.errors import UsageError

    cfg = transformers.AutoConfig.from_pretrained(tiny_llama)  # 2 heads, 1 KV head
    check_divides(cfg, 1)
    with pytest.raises(UsageError, match=r"tp=2 must divide the model's 2 attention heads and 1 KV heads"):
        check_divides(cfg, 2)


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

    cfg = transformers.AutoConfig.from_pretrained(tiny_llama)
    assert auto_attention(cfg, on_cuda=True) == "evalctx_sdpa"
    assert auto_attention(cfg, on_cuda=False) == "sdpa"
    assert auto_attention(None, on_cuda=True) == "sdpa"
    backend = make_backend(tiny_llama)  # cpu
    assert backend.row_columns()["hf_attn_implementation"] == "sdpa"


def test_auto_attention_keeps_sdpa_with_sliding_window() -> None:
    from evalctx.backends.hf import auto_attention

    cfg = transformers.MistralConfig(vocab_size=ByteTokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                     sliding_window=16)
    assert auto_attention(cfg, on_cuda=True) == "sdpa"


def _chunked_logits(model: object, ids: torch.Tensor, cache: object, chunk: int) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model(input_ids=ids[:, i:i + chunk], past_key_values=cache, use_cache=True).logits
                          for i in range(0, ids.shape[1], chunk)], dim=1)


@pytest.mark.parametrize("impl", ["sdpa", "evalctx_sdpa", "eager"])
def test_preallocated_cache_matches_dynamic_cache(tiny_llama: Path, impl: str) -> None:
    from transformers import DynamicCache

    from evalctx.backends.hf import register_lower_right_sdpa
    from evalctx.backends.hf.cache import PreallocatedCache

    register_lower_right_sdpa()
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation=impl).eval()
    ids = torch.randint(3, 200, (2, 70))
    dynamic = _chunked_logits(model, ids, DynamicCache(), 16)
    cache = PreallocatedCache(model.config.num_hidden_layers, capacity=80, batch=2)
    ours = _chunked_logits(model, ids, cache, 16)
    assert cache.length == 70 and cache.capacity == 80
    assert cache.layers[0].store.k.shape == (80, 2, 1, 32)  # allocated once, at capacity (1 KV head of 32)
    assert cache.layers[0].keys.shape == (2, 1, 70, 32)  # attention sees the filled positions
    assert cache.layers[0].keys.stride() == (32, 32, 64, 1)  # position-major: strides independent of capacity
    assert torch.allclose(dynamic, ours, atol=1e-5, rtol=1e-4)


def test_preallocated_cache_crop_and_extend_like_a_fresh_prefill(tiny_llama: Path) -> None:
    """What prefix reuse needs: keep a prefix, crop back to it, extend with another suffix, grow the capacity."""
    from evalctx.backends.hf.cache import CacheFullError, PreallocatedCache

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    prefix, a, b = torch.randint(3, 200, (1, 40)), torch.randint(3, 200, (1, 9)), torch.randint(3, 200, (1, 30))
    cache = PreallocatedCache(model.config.num_hidden_layers, capacity=50, batch=1)
    _chunked_logits(model, torch.cat([prefix, a], 1), cache, 16)
    cache.crop_to(40)
    assert cache.length == 40
    with pytest.raises(CacheFullError):
        _chunked_logits(model, b, cache, 30)
    cache.crop_to(40)  # the failed update wrote nothing past the capacity; its length stayed at 40 in layer 0
    cache.reserve(70)
    assert cache.capacity == 70 and cache.length == 40
    reused = _chunked_logits(model, b, cache, 16)
    fresh = _chunked_logits(model, torch.cat([prefix, b], 1), PreallocatedCache(3, 70, 1), 16)[:, 40:]
    assert torch.allclose(reused, fresh, atol=1e-5, rtol=1e-4)


def test_ignore_eos_decodes_the_whole_budget(tiny_llama: Path) -> None:
    tok = ByteTokenizer()
    req = [GenerationRequest(sample_id="a", prompt_ids=tok.encode("The pass key is 12345. " * 3, True), prompt="",
                             max_new_tokens=6)]
    runs = {}
    for ignore in (False, True):
        backend = make_backend(tiny_llama, chunk_size=0, ignore_eos=ignore)
        tokens: list[int] = []
        forward = backend.model.forward

        def counting(*args: object, _f: object = forward, _t: list = tokens, **kwargs: object) -> object:
            out = _f(*args, **kwargs)
            _t.append(int(out.logits[0, -1].argmax()))
            return out

        backend.model.forward = counting
        backend.eos_ids = set()
        backend.generate(req)
        backend.eos_ids = {tokens[1]}  # the second greedy token ends the answer
        tokens.clear()
        runs[ignore] = (backend.generate(req)[0], len(tokens))
    (stopped, n_stopped), (full, n_full) = runs[False], runs[True]
    assert n_full == 6 and n_stopped < n_full  # one prefill call + 5 decode steps, or fewer when it stops
    assert stopped.text == full.text and stopped.n_output_tokens == full.n_output_tokens <= 2
    assert stopped.finish_reason == full.finish_reason == "stop"


def test_memory_preflight_marks_what_does_not_fit_unsupported(tiny_llama: Path, tmp_path: Path) -> None:
    from evalctx.capacity.memory import hf_rank_memory, longest_fitting
    from evalctx.capacity.plan import GB, shape_from_hf

    shape = shape_from_hf(transformers.AutoConfig.from_pretrained(tiny_llama).to_dict())
    mem = {n: hf_rank_memory(shape, n + 8, chunk=64, dtype="fp32", attention="sdpa").total for n in (300, 600)}
    capacity_gb = (mem[300] + mem[600]) / 2 / GB  # room for 300-token prompts, not for 600
    suite = tmp_path / "s.toml"
    suite.write_text('name = "mem"\n[[tasks]]\ntask = "passkey"\nlengths = [300, 600]\ndepths = [0.5]\n'
                     'samples = 1\nmax_new_tokens = 8\n')
    code = main(["run", "--suite", str(suite), "--backend", "hf", "--model", str(tiny_llama), "--tokenizer", "byte",
                 "--out", str(tmp_path), "--run-id", "mem", "--no-progress", "--backend-opt", "device=cpu",
                 "--backend-opt", "chunk_size=64", "--backend-opt", f"memory_gb={capacity_gb}"])
    assert code == 0
    df = pd.read_parquet(tmp_path / "mem" / "results.parquet").set_index("context_length")
    assert df.loc[300, "status"] == "ok"
    assert df.loc[600, "status"] == "unsupported"
    longest = longest_fitting(shape, capacity_gb * GB, chunk=64, dtype="fp32", attention="sdpa") - 8
    assert 300 <= longest < 600
    reason = df.loc[600, "error"]
    assert reason.startswith(f"prompt 600 + max_new_tokens 8 needs {mem[600] / GB:.1f} GB per GPU (weights ")
    assert f"lengths <= {longest} fit at tp=1" in reason and "tp=2" not in reason  # 1 KV head: no tp=2


def test_weights_that_cannot_fit_stop_before_loading(tiny_llama: Path) -> None:
    from evalctx.errors import UsageError

    # The 2 GB reserve alone is over 1 GB: no tp helps, and the message must not send the user to raise it.
    with pytest.raises(UsageError, match=r"needs .* GB per GPU .* at tp=1 before any context, more than the 1 GB "
                                         r"\(memory_gb\): no tp up to 16 fits it: raise memory_gb$"):
        make_backend(tiny_llama, memory_gb=1)
    # Llama-3-8B's weights in 10 GB: tp=2 still needs 10.6 GB, tp=4 fits.
    from evalctx.capacity.plan import ModelShape

    backend = make_backend(tiny_llama, memory_gb=10)
    backend.memcheck.shape = ModelShape(num_layers=32, hidden_size=4096, num_attention_heads=32, num_kv_heads=8,
                                        head_dim=128, intermediate_size=14336, vocab_size=128256)
    backend.memcheck.dtype = "bf16"
    with pytest.raises(UsageError, match=r"at tp=1 before any context, .*: raise tp \(tp=4 fits\)$"):
        backend.memcheck.check_weights_fit()


def test_batches_split_to_fit_memory(tiny_llama: Path) -> None:
    from evalctx.capacity.memory import hf_rank_memory
    from evalctx.capacity.plan import GB, shape_from_hf

    shape = shape_from_hf(transformers.AutoConfig.from_pretrained(tiny_llama).to_dict())
    tok = ByteTokenizer()
    reqs = [GenerationRequest(sample_id=str(i), prompt_ids=tok.encode(f"The pass key is {i}1234. " * 12, True),
                              prompt="", max_new_tokens=4) for i in range(3)]
    n = len(reqs[0].prompt_ids) + 4
    two = hf_rank_memory(shape, n, chunk=64, batch=2, dtype="fp32", attention="sdpa").total
    three = hf_rank_memory(shape, n, chunk=64, batch=3, dtype="fp32", attention="sdpa").total
    backend = make_backend(tiny_llama, chunk_size=64, memory_gb=(two + three) / 2 / GB)
    out = backend.generate(reqs)
    assert [r.batch_size for r in out] == [2, 2, 1]
    assert [r.text for r in out] == [backend.generate([r])[0].text for r in reqs]


def _attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                        scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 reference for a kernel that returns its log-sum-exp (GQA heads shared, upper-left causal)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    scores = q.double() @ k.transpose(-1, -2) * (scale or q.shape[-1] ** -0.5)
    if causal:
        scores = scores.masked_fill(~torch.ones_like(scores, dtype=torch.bool).tril(), float("-inf"))
    return (scores.softmax(-1) @ v).to(q.dtype), scores.logsumexp(-1).float()


@pytest.mark.parametrize("q_len,k_len", [(1, 77), (64, 64), (64, 64 + 2048 + 1024 + 37), (30, 30 + 1024)])
def test_split_attention_merges_blocks_exactly(monkeypatch: pytest.MonkeyPatch, q_len: int, k_len: int) -> None:
    """The CUDA path's arithmetic (blocks of earlier keys + the causal square, merged by log-sum-exp), with the
    kernels replaced by a float64 reference so it runs on CPU."""
    from evalctx.backends.hf import attention

    monkeypatch.setattr(attention, "_cudnn", _attention_with_lse)
    monkeypatch.setattr(attention, "_flash", lambda q, k, v, s: _attention_with_lse(q, k, v, False, s)[0])
    q = torch.randn(2, 4, q_len, 16)
    k, v = torch.randn(2, 2, k_len, 16), torch.randn(2, 2, k_len, 16)
    got = attention.split_attention(q, k, v, None)
    mask = torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                           attn_mask=mask)
    assert torch.allclose(got, ref, atol=1e-5)


def test_cuda_path_check_covers_a_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check of the CUDA path runs on the batch layout too: a kernel that reads position-major keys of several
    sequences wrongly (here: every sequence gets the first one's keys) is caught for batches, while one sequence,
    whose layout it handles, keeps the fast path. Kernels replaced by the float64 reference so it runs on CPU."""
    from evalctx.backends.hf import attention

    def first_sequence_keys(q, k, v, causal, scale):
        return _attention_with_lse(q, k[:1].expand_as(k), v[:1].expand_as(v), causal, scale)

    monkeypatch.setattr(attention, "_CHECKED", {})
    monkeypatch.setattr(attention, "_flash", lambda q, k, v, s: _attention_with_lse(q, k, v, False, s)[0])
    monkeypatch.setattr(attention, "_cudnn", _attention_with_lse)
    q2, q1, k = torch.zeros(2, 4, 1, 16), torch.zeros(1, 4, 1, 16), torch.zeros(1, 2, 1, 16)
    assert attention.cuda_path_ok(q2, k) and attention.cuda_path_ok(q1, k)
    monkeypatch.setattr(attention, "_CHECKED", {})
    monkeypatch.setattr(attention, "_cudnn", first_sequence_keys)
    assert attention.cuda_path_ok(q1, k)
    assert not attention.cuda_path_ok(q2, k)
    assert attention.cuda_kernels() == "flash (causal_lower_right): the cuDNN path failed its check"


def test_prefix_blocks_repeat_few_shapes() -> None:
    from evalctx.backends.hf.attention import prefix_blocks

    assert prefix_blocks(0) == []
    assert prefix_blocks(1000) == [(0, 1000)]
    assert prefix_blocks(11 * 1024 + 5) == [(0, 8192), (8192, 10240), (10240, 11264), (11264, 11269)]
    # every chunk of a 1M prefill in 8K chunks: 7 block sizes (8K..512K), at most 7 blocks per chunk
    sizes = {b - a for p in range(0, 1 << 20, 8192) for a, b in prefix_blocks(p)}
    assert len(sizes) == 7 and max(len(prefix_blocks(p)) for p in range(0, 1 << 20, 8192)) == 7
