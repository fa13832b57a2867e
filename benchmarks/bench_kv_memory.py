"""What the hf backend's KV cache layouts cost and save on a GPU: bf16 vs fp8 vs int8 KV, and window-only sliding
layers vs every position kept, at long context (TTFT, decode ms/token, torch's peak memory, the KV bytes the cache
holds against what evalctx.capacity.memory plans, and the first-token logits' relative error against the bf16 cache).

    python benchmarks/bench_kv_memory.py --out /tmp/kv \\
        --case llama8b:32:131072:bf16,fp8,int8 --case llama8b:4:1048576:bf16,fp8 \\
        --case gemma3:12:131072:bf16-full,bf16,fp8
    python benchmarks/bench_kv_memory.py --small --out /tmp/kv   # a toy run on CPU, to try the script

A case is SHAPE:LAYERS:LENGTH:VARIANTS. SHAPE llama8b is Llama-3-8B's (hidden 4096, 32 heads, 8 KV heads of 128);
gemma3 is the same sizes in Gemma 3's layout (5 sliding layers of window 1024 to 1 global, q/k norms). VARIANTS:
bf16, fp8, int8 (the KV dtype; window layers hold their window), and ``-full`` to keep every position in every
layer (window_kv=false). Each variant runs ``--repeats`` random prompts of LENGTH tokens with ``ignore_eos`` and 32
new tokens; the last one's numbers are kept (the first pays for kernel selection). One load of a model serves all
its variants: they differ only in the cache each request builds (HFBackend.new_cache reads ``kv_dtype`` and
``kv_windows``), and the memory planned for each is evalctx.capacity.memory's with the variant's settings.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

GiB = 2**30
LLAMA8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
               head_dim=128, vocab_size=128256)
SMALL = dict(hidden_size=256, intermediate_size=768, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
             vocab_size=1024)


def config(shape: str, layers: int, small: bool) -> object:
    import transformers

    dims = SMALL if small else LLAMA8B
    common = dict(num_hidden_layers=layers, max_position_embeddings=1 << 21, bos_token_id=1, eos_token_id=2,
                  pad_token_id=3, tie_word_embeddings=False, dtype="bfloat16", **dims)
    if shape == "llama8b":
        return transformers.LlamaConfig(architectures=["LlamaForCausalLM"], rope_theta=500000.0, **common)
    if shape == "gemma3":
        window = 64 if small else 1024
        return transformers.Gemma3TextConfig(
            architectures=["Gemma3ForCausalLM"], sliding_window=window, query_pre_attn_scalar=dims["head_dim"],
            layer_types=[("full_attention" if (i + 1) % 6 == 0 else "sliding_attention") for i in range(layers)],
            **common)
    raise SystemExit(f"unknown shape {shape!r}: llama8b or gemma3")


def run_case(model: Path, length: int, variants: list[str], repeats: int, chunk: int, new: int) -> list[dict]:
    import torch

    from evalctx.backends.base import BackendContext, parse_options
    from evalctx.backends.hf import HFBackend
    from evalctx.backends.hf.cache import model_windows
    from evalctx.capacity.memory import hf_rank_memory
    from evalctx.capacity.plan import shape_from_hf
    from evalctx.records import GenerationRequest
    from evalctx.models.tokenizer import load_tokenizer

    opts = parse_options(HFBackend, {"chunk_size": chunk, "ignore_eos": True, "memory_gb": 0})
    backend = HFBackend(opts, BackendContext(model=str(model), tokenizer=load_tokenizer(str(model))))
    shape = shape_from_hf(backend.config.to_dict(), str(model))
    windows = model_windows(backend.config)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 1000, (length,), generator=gen).tolist() for _ in range(repeats)]
    rows, base_logits = [], None
    cuda = backend.device.type == "cuda"
    for variant in variants:
        kv, _, full = variant.partition("-")
        backend.kv_dtype = None if kv in ("bf16", "fp32") else kv
        backend.kv_windows = None if full else windows
        backend._cache = None
        if cuda:
            torch.cuda.empty_cache()
        res = None
        for ids in prompts:
            t0 = time.perf_counter()
            res = backend.generate([GenerationRequest(sample_id="p", prompt_ids=ids, prompt="",
                                                      max_new_tokens=new)])[0]
            wall = time.perf_counter() - t0
        assert res is not None
        if res.error:
            rows.append({"variant": variant, "length": length, "error": res.error})
            continue
        logits = backend.last_prefill_logits.float()
        if base_logits is None:
            base_logits = logits
        err = float((logits - base_logits).norm() / base_logits.norm())
        planned = hf_rank_memory(shape, length + new, chunk=chunk, dtype=backend.short_dtype, reserve_gb=0,
                                 attention=backend.attn_implementation, kv_dtype=backend.kv_dtype,
                                 windows=backend.kv_windows)
        rows.append({
            "model": model.name, "layers": shape.num_layers, "length": length, "variant": variant,
            "ttft_s": res.ttft_s, "decode_ms": (res.latency_s - res.ttft_s) / (new - 1) * 1e3, "wall_s": wall,
            "kv_GiB": backend._cache.held_bytes() / GiB, "kv_planned_GiB": planned.kv_cache / GiB,
            "peak_GiB": (res.peak_memory_bytes or 0) / GiB or None, "planned_GiB": planned.total / GiB,
            "logit_rel_err": err, "kv_layout": planned.layout_text(),
        })
        print(json.dumps(rows[-1]), flush=True)
    backend.close()
    del backend
    if cuda:
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="append", default=[], metavar="SHAPE:LAYERS:LENGTH:VARIANTS")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--models", type=Path, default=Path("/dev/shm/evalctx-kv-models"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--small", action="store_true", help="toy shapes and lengths that run on CPU")
    args = ap.parse_args()
    import pandas as pd
    import torch

    from bench_hf_long import write_random

    cases = args.case or (["llama8b:2:1024:bf16,fp8,int8", "gemma3:6:1024:bf16-full,bf16,fp8"] if args.small else
                          ["llama8b:32:131072:bf16,fp8,int8"])
    chunk = 256 if args.small and args.chunk == 8192 else args.chunk
    rows = []
    for case in cases:
        shape, layers, length, variants = case.split(":")
        model = args.models / f"{shape}-{layers}{'-small' if args.small else ''}"
        if not (model / "config.json").exists():
            t0 = time.perf_counter()
            write_random(model, config(shape, int(layers), args.small))
            print(f"built {model} in {time.perf_counter() - t0:.0f} s", flush=True)
        rows += run_case(model, int(length), variants.split(","), args.repeats, chunk, args.new_tokens)
    df = pd.DataFrame(rows)
    cuda = torch.cuda.is_available()
    dev = torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu"
    print(f"machine: {platform.node()} | {dev} | torch {torch.__version__} | chunk {chunk}")
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.max_colwidth", 70,
                           "display.float_format", "{:.3f}".format):
        print(df.to_string(index=False))
    args.out.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out / "bench_kv_memory.csv", index=False)


if __name__ == "__main__":
    main()
