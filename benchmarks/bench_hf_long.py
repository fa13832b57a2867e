"""Long-context speed of the hf backend against the hardware: TTFT vs the ideal, decode ms/token, peak memory.

    # a random-weight Llama-3-8B-shaped model (4 of its 32 layers), built on the GPU, tokenizer from 'tiny'
    python benchmarks/bench_hf_long.py build /dev/shm/l3-4 --layers 4
    # one passkey sample per length, tp=1 and tp=2, each a real `mpirun -n TP python -m evalctx.cli run`
    python benchmarks/bench_hf_long.py run --model /dev/shm/l3-4 --lengths 32768 131072 1048576 --tp 1 2
    # where one prefill's GPU time goes (torch.profiler, tp=1)
    python benchmarks/bench_hf_long.py profile --model /dev/shm/l3-4 --length 131072

The numbers quoted in the README are in benchmarks/results/ (CSV and the measured ceilings).

Ideal TTFT = GEMM FLOPs / the GEMM rate + causal-attention FLOPs / the attention rate, per GPU (both split by tp),
with the rates measured in the same process before the runs: a bf16 8192^3 matmul, and causal SDPA with the
model's heads per GPU at each length up to 128K (the 128K rate stands for longer lengths: measuring attention at
1M takes 15 s a call). GEMM FLOPs per token and layer = 2 x (q, k, v, o and the three MLP matrices); attention
FLOPs per layer = 2 x 2 x heads x head_dim x n(n+1)/2 (QK^T and PV, causal); lm_head for the last position only.
Decode ms/token = (latency - TTFT) / (max_new_tokens - 1), with ``ignore_eos`` so every run decodes its budget.
Planned GiB = evalctx.capacity.memory's weights + KV cache + activations for the run (no reserve), beside torch's peak.
``--small`` builds a 2-layer model that runs on CPU, to try the script.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GiB = 2**30
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 head_dim=128, vocab_size=128256, rope_theta=500000.0)
SMALL = dict(hidden_size=256, intermediate_size=768, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
             vocab_size=1024, rope_theta=10000.0)
SUITE = """
name = "hf-long"
[[tasks]]
task = "passkey"
lengths = [{lengths}]
depths = [0.5]
samples = 1
max_new_tokens = {new}
"""


def build(dest: Path, layers: int, small: bool) -> None:
    """A Llama config with random bf16 weights (:func:`write_random`)."""
    from transformers import LlamaConfig

    shape = SMALL if small else LLAMA3_8B
    cfg = LlamaConfig(architectures=["LlamaForCausalLM"], num_hidden_layers=layers, max_position_embeddings=1 << 21,
                      bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False, dtype="bfloat16",
                      **shape)
    write_random(dest, cfg)


def write_random(dest: Path, cfg: "object") -> None:
    """A model of transformers config ``cfg`` with random bf16 weights (normal, std 0.02; norms 1), written shard by
    shard from the GPU when there is one, plus the embedded 'tiny' model's tokenizer (its ids fit any vocabulary)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from evalctx.models.embedded import resolve_model

    dest.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(dest)
    with torch.device("meta"):
        names = {k: v.shape for k, v in AutoModelForCausalLM.from_config(cfg).state_dict().items()}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    index: dict[str, str] = {}
    n_bytes, part = 0, 0

    def flush() -> None:
        nonlocal shard, n_bytes, part
        if shard:
            name = f"model-{part:05d}.safetensors"
            save_file(shard, str(dest / name), metadata={"format": "pt"})
            index.update({k: name for k in shard})
            shard, n_bytes, part = {}, 0, part + 1

    for key, size in names.items():
        if key.endswith("norm.weight"):
            # Gemma-style norms scale by (1 + weight): zeros there are the identity, as ones are for Llama's
            one = 0.0 if getattr(cfg, "model_type", "").startswith("gemma") else 1.0
            t = torch.full(size, one, dtype=torch.bfloat16)
        else:
            t = (torch.randn(size, generator=gen, device=device, dtype=torch.float32) * 0.02).to(torch.bfloat16).cpu()
        shard[key] = t
        n_bytes += t.numel() * 2
        if n_bytes > 4 * GiB:
            flush()
    flush()
    (dest / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    tiny = resolve_model("tiny").path
    for f in tiny.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, dest / f.name)
    (dest / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    print(f"built {dest}: {cfg.num_hidden_layers} layers, {sum(s.numel() for s in names.values()) / 1e9:.3f} B "
          "parameters")


def flops(cfg: dict, n: int, tp: int) -> tuple[float, float]:
    """(GEMM, attention) FLOPs of a prefill of ``n`` tokens on one of ``tp`` GPUs."""
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    per_token = 2 * (h * q + 2 * h * kv + q * h + 3 * h * inter)
    gemm = layers * per_token * n + 2 * h * cfg["vocab_size"]
    attn = layers * 2 * 2 * q * n * (n + 1) / 2
    return gemm / tp, attn / tp


def ceilings(cfg: dict, lengths: list[int], tps: list[int]) -> dict:
    """Measured TFLOP/s: GEMM 8192^3, and causal SDPA per (tp, length) with the heads one GPU runs."""
    import torch

    def timed(fn, reps: int) -> float:
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return sorted(times)[len(times) // 2]

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    out = {"gemm": 2 * 8192**3 / timed(lambda: a @ b, 5) / 1e12, "attention": {}}
    del a, b
    hd = cfg["head_dim"]
    for tp in tps:
        heads, kv = cfg["num_attention_heads"] // tp, cfg["num_key_value_heads"] // tp
        for n in sorted({min(x, 131072) for x in lengths}):
            q = torch.randn(1, heads, n, hd, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(1, kv, n, hd, device="cuda", dtype=torch.bfloat16)
            v = torch.randn(1, kv, n, hd, device="cuda", dtype=torch.bfloat16)
            t = timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                               enable_gqa=True), 3)
            out["attention"][f"{tp}/{n}"] = 2 * 2 * heads * hd * n * (n + 1) / 2 / t / 1e12
            del q, k, v
    torch.cuda.empty_cache()
    return out


def mpirun() -> list[str]:
    exe = shutil.which("mpirun") or str(Path(sys.executable).parent / "mpirun")
    flags = ["--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    return [exe, *flags]


def run_one(model: str, lengths: list[int], tp: int, chunk: int, new: int, out: Path, opts: list[str]) -> Path:
    suite = out / "suite.toml"
    suite.write_text(SUITE.format(lengths=", ".join(map(str, lengths)), new=new))
    run_id = f"tp{tp}-c{chunk}"
    cmd = [*mpirun(), "-n", str(tp), sys.executable, "-m", "evalctx.cli", "run", "--suite", str(suite),
           "--model", model, "--backend", "hf", "--out", str(out), "--run-id", run_id, "--no-progress",
           "--backend-opt", f"tp={tp}", "--backend-opt", f"chunk_size={chunk}", "--backend-opt", "ignore_eos=true",
           *[x for o in opts for x in ("--backend-opt", o)]]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    print(f"tp={tp}: exit {proc.returncode} in {time.perf_counter() - t0:.1f} s (load, prompts, prefill, decode)")
    if proc.returncode:
        print(proc.stdout[-3000:], proc.stderr[-6000:], sep="\n")
    return out / run_id / "results.parquet"


def main_run(args: argparse.Namespace) -> None:
    import pandas as pd

    from evalctx.capacity.memory import hf_rank_memory
    from evalctx.capacity.plan import load_shape

    cfg = json.loads((Path(args.model) / "config.json").read_text())
    shape, _ = load_shape(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    rates = None
    if args.ceilings:  # rates measured earlier on the same machine (a long run need not measure them again)
        rates = json.loads(Path(args.ceilings).read_text())
    elif cuda:
        rates = ceilings(cfg, args.lengths, args.tp)
    rows = []
    for tp in args.tp:
        path = run_one(args.model, args.lengths, tp, args.chunk, args.new_tokens, out, args.opt)
        if not path.exists():
            continue
        for r in pd.read_parquet(path).to_dict("records"):
            n = int(r["context_length"])
            mem = hf_rank_memory(shape, n + args.new_tokens, chunk=args.chunk, tp=tp, reserve_gb=0,
                                 dtype="bf16" if cuda else "fp32")
            row = {"tp": tp, "length": n, "status": r["status"], "ttft_s": r["ttft_s"],
                   "decode_ms": (r["latency_s"] - r["ttft_s"]) / (args.new_tokens - 1) * 1e3
                   if r["ttft_s"] is not None and args.new_tokens > 1 else None,
                   "peak_GiB": (r["peak_memory_bytes"] or 0) / GiB or None, "planned_GiB": mem.total / GiB,
                   "answer": r["completion"], "error": r["error"]}
            if rates and r["ttft_s"]:
                gemm, attn = flops(cfg, n, tp)
                rate = rates["attention"][f"{tp}/{min(n, 131072)}"]
                ideal = gemm / (rates["gemm"] * 1e12) + attn / (rate * 1e12)
                row.update(ideal_s=ideal, of_ideal=ideal / r["ttft_s"], attn_share=attn / (rate * 1e12) / ideal)
            rows.append(row)
    if not rows:
        return
    df = pd.DataFrame(rows)
    dev = torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu"
    print(f"machine: {platform.node()} | {dev} x {torch.cuda.device_count() if cuda else 0} | torch "
          f"{torch.__version__} | model {args.model}: {cfg['num_hidden_layers']} layers | chunk {args.chunk}")
    if rates:
        att = ", ".join(f"tp{k.split('/')[0]} {int(k.split('/')[1]) // 1024}K {v:.0f}"
                        for k, v in rates["attention"].items())
        print(f"ceilings (TFLOP/s): GEMM {rates['gemm']:.0f}; causal SDPA {att}")
    with pd.option_context("display.width", 220, "display.max_columns", 30, "display.float_format", "{:.3f}".format):
        print(df.drop(columns=["error"] if df["error"].isna().all() else []).to_string(index=False))
    df.to_csv(out / "bench_hf_long.csv", index=False)
    (out / "ceilings.json").write_text(json.dumps(rates or {}, indent=1))


def profile(args: argparse.Namespace) -> None:
    """One prefill of ``--length`` random tokens at tp=1 under torch.profiler: the kernels that take the time."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from evalctx.backends.base import BackendContext, parse_options
    from evalctx.backends.hf import HFBackend
    from evalctx.records import GenerationRequest
    from evalctx.models.tokenizer import load_tokenizer

    opts = parse_options(HFBackend, {"chunk_size": args.chunk, "ignore_eos": True})
    backend = HFBackend(opts, BackendContext(model=args.model, tokenizer=load_tokenizer(args.model)))
    ids = torch.randint(5, 1000, (args.length,)).tolist()
    req = [GenerationRequest(sample_id="p", prompt_ids=ids, prompt="", max_new_tokens=2)]
    backend.generate(req)  # warm-up: kernels chosen, allocator primed
    cuda = torch.cuda.is_available()
    with torch_profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        res = backend.generate(req)[0]
    print(f"TTFT {res.ttft_s:.3f} s at {args.length} tokens, chunk {args.chunk}")
    print(prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=args.rows,
                                    max_name_column_width=90))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write a random-weight Llama-3-8B-shaped model directory")
    b.add_argument("dest", type=Path)
    b.add_argument("--layers", type=int, default=4)
    b.add_argument("--small", action="store_true", help="a 2-layer-sized toy shape that runs on CPU")
    r = sub.add_parser("run", help="time one passkey sample per length and tp")
    r.add_argument("--model", required=True)
    r.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072, 1048576])
    r.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    r.add_argument("--chunk", type=int, default=8192)
    r.add_argument("--new-tokens", type=int, default=32)
    r.add_argument("--opt", nargs="*", default=[], help="more --backend-opt key=value for every run")
    r.add_argument("--ceilings", help="ceilings.json of an earlier run on the same machine, instead of measuring")
    r.add_argument("--out", default="bench_hf_long_out")
    f = sub.add_parser("profile", help="the CUDA kernels of one prefill at tp=1")
    f.add_argument("--model", required=True)
    f.add_argument("--length", type=int, default=131072)
    f.add_argument("--chunk", type=int, default=8192)
    f.add_argument("--rows", type=int, default=25)
    args = ap.parse_args()
    if args.cmd == "build":
        build(args.dest, args.layers, args.small)
    elif args.cmd == "profile":
        profile(args)
    else:
        main_run(args)


if __name__ == "__main__":
    main()
