"""Replica scaling of the hf backend under mpirun: 1 replica vs N replicas (one GPU each) on the same suite.

    python benchmarks/bench_replicas.py --ranks 1 2 --model tiny --lengths 8192 16384 --samples 16

Checks that every configuration gives the same answers sample by sample, and prints wall time and prompt
tokens per second for each (wall time covers the whole `evalctx run`: load, prompt building and generation).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

SUITE = """
name = "replicas"
[[tasks]]
task = "passkey"
lengths = [{lengths}]
depths = {{ linear = 4 }}
samples = {samples}
max_new_tokens = 8
"""


def mpirun() -> str:
    local = Path(sys.executable).parent / "mpirun"
    found = str(local) if local.exists() else shutil.which("mpirun")
    if not found:
        raise SystemExit("mpirun not found")
    return found


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384])
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--out", default=None)
    ap.add_argument("--backend-opt", action="append", default=[])
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_replicas_"))
    out.mkdir(parents=True, exist_ok=True)
    suite = out / "suite.toml"
    suite.write_text(SUITE.format(lengths=", ".join(map(str, args.lengths)), samples=args.samples))
    rows, tables = [], {}
    for n in args.ranks:
        run_id = f"n{n}"
        cmd = [mpirun(), "--oversubscribe", "-n", str(n)]
        if os.geteuid() == 0:
            cmd.insert(1, "--allow-run-as-root")
        cmd += [sys.executable, "-m", "evalctx.cli", "run", "--suite", str(suite), "--model", args.model,
                "--backend", "hf", "--out", str(out), "--run-id", run_id, "--no-progress"]
        for opt in args.backend_opt:
            cmd += ["--backend-opt", opt]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:])
            raise SystemExit(f"{n} ranks failed with exit {proc.returncode}")
        df = pd.read_parquet(out / run_id / "results.parquet")
        tables[n] = df.set_index("sample_id").sort_index()
        gen = df.groupby("replica")["latency_s"].sum().max()  # the slowest replica bounds generation time
        rows.append({"ranks": n, "samples": len(df), "accuracy": df["score"].mean(), "wall_s": wall,
                     "prompt_tok_per_s_wall": df["context_length"].sum() / wall,
                     "generate_s_slowest_replica": gen,
                     "prompt_tok_per_s_generate": df["context_length"].sum() / gen})
    base = tables[args.ranks[0]]
    for n, t in tables.items():
        same = (t["completion"] == base["completion"]).all() and len(t) == len(base)
        print(f"{n} ranks: answers identical to {args.ranks[0]} rank(s): {same}")
    res = pd.DataFrame(rows)
    first = res.iloc[0]
    res["speedup_wall"] = first["wall_s"] / res["wall_s"]
    res["speedup_generate"] = first["generate_s_slowest_replica"] / res["generate_s_slowest_replica"]
    try:
        import torch

        print("devices:", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
    except ImportError:
        pass
    print(res.to_string(index=False))
    res.to_csv(out / "bench_replicas.csv", index=False)


if __name__ == "__main__":
    main()
