"""Long-context timing of the hf backend: one passkey sample per length, stock sdpa vs evalctx_sdpa.

    python benchmarks/bench_hf_long.py --model tiny --lengths 32768 131072 1048576 [--out DIR]

Prints, per (attention, length): prefill time (TTFT), total latency, prefill tokens/s, peak GPU memory and the
answer. Each configuration is a normal `evalctx run` (so the numbers are what a user gets), in its own run dir.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import pandas as pd

from evalctx.cli import main as evalctx_main

SUITE = """
name = "hf-long"
[[tasks]]
task = "passkey"
lengths = [{lengths}]
depths = [0.5]
samples = 1
max_new_tokens = 8
"""


def run(model: str, lengths: list[int], attn: str, chunk: int, out: Path, device: str) -> pd.DataFrame:
    suite = out / "suite.toml"
    suite.write_text(SUITE.format(lengths=", ".join(map(str, lengths))))
    run_id = f"{attn}-c{chunk}"
    code = evalctx_main(["run", "--suite", str(suite), "--model", model, "--backend", "hf", "--out", str(out),
                         "--run-id", run_id, "--no-progress", "--backend-opt", f"attn_implementation={attn}",
                         "--backend-opt", f"chunk_size={chunk}", "--backend-opt", f"device={device}"])
    df = pd.read_parquet(out / run_id / "results.parquet")
    df["attn"] = attn
    df["chunk"] = chunk
    df["exit"] = code
    return df


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072, 1048576])
    ap.add_argument("--attn", nargs="+", default=["sdpa", "evalctx_sdpa"])
    ap.add_argument("--chunks", type=int, nargs="+", default=[8192])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_hf_long_"))
    out.mkdir(parents=True, exist_ok=True)
    frames = []
    for chunk in args.chunks:
        for attn in args.attn:
            try:
                frames.append(run(args.model, args.lengths, attn, chunk, out, args.device))
            except Exception as exc:  # one configuration failing (e.g. OOM at load) must not hide the others
                print(f"{attn} chunk {chunk}: failed: {type(exc).__name__}: {exc}")
    if not frames:
        return
    df = pd.concat(frames, ignore_index=True)
    df["peak_GiB"] = df["peak_memory_bytes"] / 2**30
    cols = ["attn", "chunk", "context_length", "status", "ttft_s", "latency_s", "prefill_tokens_per_s", "peak_GiB",
            "target", "completion", "score", "error"]
    try:
        import torch

        dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    except ImportError:
        dev = "cpu"
    print(f"machine: {platform.node()} | device: {dev}")
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(df[cols].sort_values(["context_length", "attn"]).to_string(index=False))
    df[cols].to_csv(out / "bench_hf_long.csv", index=False)


if __name__ == "__main__":
    main()
