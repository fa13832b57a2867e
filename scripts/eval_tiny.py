#!/usr/bin/env python3
"""Accuracy table of a model directory (default: the embedded tiny Llama) on evalctx's own prompts.

Loads tokenizer and model with transformers (offline), builds samples with the real task generators, greedy-decodes
each (length, depth) cell as one batch and scores it with the task's scorer. Prints one table per prompt mode:
rows = task variant x context length, columns = needle depth, then the row mean.

    python scripts/eval_tiny.py                                   # CPU, a short check
    python scripts/eval_tiny.py --device cuda --samples 20 --lengths 256 512 1024 2048 4096 8192 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "passkey": ("passkey", {"template": "trtllm", "haystack": "noise"}),
    "passkey-essay": ("passkey", {"template": "trtllm", "haystack": "essay"}),
    "passkey-landmark": ("passkey", {"template": "landmark", "haystack": "noise"}),
    "passkey-landmark-essay": ("passkey", {"template": "landmark", "haystack": "essay"}),
    "niah": ("niah_single", {"haystack": "noise"}),
    "niah-essay": ("niah_single", {"haystack": "essay"}),
}
SEED_BASE = 10_000_000  # away from nothing in particular: training draws 31-bit seeds at random


def get_task_class(name: str):
    from evalctx.tasks import get_task

    return get_task(name)


def greedy(model: Any, ids: Any, max_new: int, eos: int) -> list[list[int]]:
    """Greedy decoding of a batch of equal-length prompts with a KV cache; stops when every row hit EOS."""
    import torch
    from transformers import DynamicCache

    warnings.filterwarnings("ignore", message=".*past_key_values.*")  # renamed in newer transformers; both work
    with torch.inference_mode():
        cache = DynamicCache()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1)
        gen = [nxt]
        done = nxt == eos
        for _ in range(max_new - 1):
            if bool(done.all()):
                break
            out = model(input_ids=nxt[:, None], past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1)
            gen.append(nxt)
            done |= nxt == eos
    rows = torch.stack(gen, 1).tolist()
    return [r[:r.index(eos)] if eos in r else r for r in rows]


def evaluate(model_dir: Path, variants: list[str], modes: list[str], lengths: list[int], depths: list[float],
             samples: int, device: str, dtype: str, seed: int, max_batch: int, log: bool = True) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from evalctx.tasks.scoring import score
    from evalctx.models.tokenizer import HFTokenizer

    tok = HFTokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, dtype=getattr(torch, dtype),
                                                 attn_implementation="sdpa").to(device).eval()
    eos = model.generation_config.eos_token_id
    cells: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for mode in modes:
        for v in variants:
            task_name, opts = VARIANTS[v]
            task = get_task_class(task_name)(tok, opts, mode)
            for L in lengths:
                for d in depths:
                    ss = [task.make_sample(L, d, SEED_BASE + seed * 100_000 + i) for i in range(samples)]
                    assert all(len(s.prompt_ids) == L for s in ss)
                    max_new = max(s.max_new_tokens for s in ss)
                    comps: list[str] = []
                    tc = time.perf_counter()
                    for b in range(0, len(ss), max_batch):
                        part = ss[b:b + max_batch]
                        ids = torch.tensor([s.prompt_ids for s in part], device=device)
                        comps += [tok.decode(r) for r in greedy(model, ids, max_new, eos)]
                    vals = [score(s.scorer, c, s.target).value for s, c in zip(ss, comps)]
                    cell = {"variant": v, "task": task_name, "mode": mode, "length": L, "depth": d,
                            "n": len(vals), "accuracy": sum(vals) / len(vals), "seconds": time.perf_counter() - tc,
                            "examples": [{"target": s.target[0], "completion": c} for s, c in zip(ss[:2], comps[:2])]}
                    cells.append(cell)
                    if log:
                        print(f"  {mode:4s} {v:24s} L={L:6d} d={d:.2f} acc={cell['accuracy']:.2f} "
                              f"({cell['seconds']:.1f} s) e.g. {comps[0]!r} for {ss[0].target[0]!r}", flush=True)
    return {"model": str(model_dir), "device": device, "dtype": dtype, "samples": samples,
            "seconds": round(time.perf_counter() - t0, 1), "cells": cells}


def time_forward(model_dir: Path, lengths: list[int], device: str, dtype: str, chunk: int = 4096,
                 new_tokens: int = 8, repeats: int = 3) -> list[dict[str, Any]]:
    """Seconds per sample as the hf backend spends them: chunked prefill (logits of the last position only), then
    ``new_tokens`` - 1 decode steps; median of ``repeats``. The weights do not matter, only the shapes."""
    import statistics

    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    warnings.filterwarnings("ignore", message=".*past_key_values.*")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, dtype=getattr(torch, dtype),
                                                 attn_implementation="sdpa").to(device).eval()
    rows = []
    gen = torch.Generator().manual_seed(0)
    for L in lengths:
        ids = torch.randint(8, model.config.vocab_size, (1, L), generator=gen).to(device)
        times = []
        for _ in range(repeats + 1):  # the first is a warm-up
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.inference_mode():
                cache = DynamicCache()
                for a in range(0, L, chunk):
                    out = model(input_ids=ids[:, a:a + chunk], past_key_values=cache, use_cache=True,
                                logits_to_keep=1)
                nxt = out.logits[:, -1].argmax(-1)
                t_prefill = time.perf_counter() - t0
                for _ in range(new_tokens - 1):
                    out = model(input_ids=nxt[:, None], past_key_values=cache, use_cache=True)
                    nxt = out.logits[:, -1].argmax(-1)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append((t_prefill, time.perf_counter() - t0))
        times = times[1:]
        rows.append({"length": L, "prefill_s": statistics.median(t for t, _ in times),
                     "sample_s": statistics.median(t for _, t in times)})
        print(f"  L={L:6d} prefill {rows[-1]['prefill_s']:.3f} s, with {new_tokens} new tokens "
              f"{rows[-1]['sample_s']:.3f} s", flush=True)
    return rows


def table(result: dict[str, Any]) -> str:
    cells = result["cells"]
    depths = sorted({c["depth"] for c in cells})
    lines = []
    for mode in dict.fromkeys(c["mode"] for c in cells):
        lines.append(f"\n{mode} mode, accuracy (n={result['samples']} per cell)")
        lines.append(f"{'variant':24s} {'length':>7s} " + " ".join(f"{d:>6.2f}" for d in depths) + "   mean")
        for v in dict.fromkeys(c["variant"] for c in cells):
            for L in sorted({c["length"] for c in cells if c["variant"] == v and c["mode"] == mode}):
                row = {c["depth"]: c["accuracy"] for c in cells
                       if c["variant"] == v and c["mode"] == mode and c["length"] == L}
                mean = sum(row.values()) / len(row)
                lines.append(f"{v:24s} {L:7d} " + " ".join(f"{row.get(d, float('nan')):6.2f}" for d in depths)
                             + f"  {mean:5.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(REPO / "evalctx" / "data" / "models" / "tiny"))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--modes", nargs="+", default=["raw"], choices=["raw", "chat"])
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2048])
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--samples", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--batch", type=int, default=32, help="most prompts per forward pass")
    p.add_argument("--json", default=None, help="also write all cells (with example completions) here")
    p.add_argument("--time-lengths", type=int, nargs="+", default=None,
                   help="only time one sample per length (batch 1, chunked prefill + 8 new tokens) and exit")
    a = p.parse_args(argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    if a.time_lengths:
        rows = time_forward(Path(a.model), a.time_lengths, a.device, a.dtype)
        if a.json:
            Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")
        return
    res = evaluate(Path(a.model), a.variants, a.modes, a.lengths, a.depths, a.samples, a.device, a.dtype, a.seed,
                   a.batch)
    print(table(res))
    print(f"\n{len(res['cells'])} cells in {res['seconds']} s on {a.device}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
