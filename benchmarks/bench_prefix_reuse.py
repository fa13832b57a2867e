"""Depth-sweep prefix reuse of the hf backend: an N-depth linear passkey sweep at one length, run in the order the
runner gives it (evalctx.run.prefix_order), once cold and once with ``prefix_reuse``: prompt tokens computed, prefill
time (the sum of TTFT), generation wall time, and whether the answers are the same token ids.

    # CPU: the embedded tiny model
    python benchmarks/bench_prefix_reuse.py --model tiny --lengths 4096 --chunk 256
    # GPU: a random-weight Llama-3-8B-shaped model (4 of its 32 layers), see bench_hf_long.py
    python benchmarks/bench_hf_long.py build /dev/shm/l3-4 --layers 4
    python benchmarks/bench_prefix_reuse.py --model /dev/shm/l3-4 --lengths 32768 131072 --chunk 8192

Both configurations run in one process, alternating (``--repeats`` passes each; per sample the fastest counts:
a shared machine's noise only adds time), each pass after a warm-up prefill of a random prompt of the sweep's
length (kernels, cuDNN plans and the allocator primed alike; it shares no prefix with the sweep, so every pass
starts cold). "ideal" is what exact reuse of every common prefix would compute (no rounding to whole chunks), the least
any order can. Writes bench_prefix_reuse.csv (one row per sample and configuration) and prints the summary.
"""

from __future__ import annotations

import argparse
import gc
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evalctx.config import parse_suite  # noqa: E402
from evalctx.run.prefix_order import computed_tokens, order_by_prefix, prefix_windows  # noqa: E402
from evalctx.records import GenerationRequest  # noqa: E402
from evalctx.run.sampling import SampleBuilder  # noqa: E402
from evalctx.models.tokenizer import load_tokenizer  # noqa: E402


def sweep(model: str, length: int, depths: int, mode: str) -> list[Any]:
    """The sweep's samples in the runner's order (one window; batch size 1)."""
    suite = parse_suite({"name": "prefix-reuse", "prompt_mode": mode, "tasks": [
        {"task": "passkey", "lengths": [length], "depths": {"linear": depths}, "samples": 1}]}, "bench", "bench")
    builder = SampleBuilder(suite, load_tokenizer(model))
    t0 = time.perf_counter()
    windows = prefix_windows(builder.specs())
    samples = [order_by_prefix([builder.build(s) for s in w]) for w in windows]
    print(f"{length}: built {sum(map(len, samples))} prompts in {time.perf_counter() - t0:.1f} s", flush=True)
    return [s for w in samples for s in w]


class IdsTokenizer:
    """The model's tokenizer, except that ``decode`` spells out the ids: answers are compared token by token.
    A random-weight model's answers are mostly ids that decode to nothing (special or out-of-range ids), so
    comparing their text would find "same answers" where the tokens differ."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)

    def decode(self, ids: Any) -> str:
        return " ".join(str(int(i)) for i in ids)


def backend_for(model: str, reuse: bool, chunk: int, extra: dict[str, Any]) -> Any:
    from evalctx.backends.base import BackendContext, parse_options
    from evalctx.backends.hf import HFBackend

    opts = parse_options(HFBackend, {"chunk_size": chunk, "prefix_reuse": reuse, **extra})
    return HFBackend(opts, BackendContext(model=model, tokenizer=IdsTokenizer(load_tokenizer(model))))


def run(backend: Any, samples: list[Any]) -> tuple[list[dict[str, Any]], float, float]:
    """One pass over the sweep after a warm-up prompt: per-sample rows, the pass's wall and CPU seconds."""
    n = samples[0].context_length
    rng = random.Random(0)
    vocab = int(backend.model.config.vocab_size)
    warm = [rng.randrange(5, min(1000, vocab)) for _ in range(n)]  # no BOS: shares no prefix with the sweep
    backend.generate([GenerationRequest(sample_id="warm-up", prompt_ids=warm, prompt="", max_new_tokens=2)])
    rows = []
    t0, c0 = time.perf_counter(), time.process_time()
    for s in samples:
        c = time.process_time()
        r = backend.generate([GenerationRequest(sample_id=s.id, prompt_ids=s.prompt_ids, prompt=s.prompt,
                                                max_new_tokens=s.max_new_tokens)])[0]
        if r.error:
            raise SystemExit(f"{s.id}: {r.error}")
        rows.append({"prefix_reuse": backend.options.prefix_reuse, "length": s.context_length, "depth": s.depth,
                     "n_cached_prompt_tokens": r.n_cached_prompt_tokens, "ttft_s": r.ttft_s,
                     "latency_s": r.latency_s, "cpu_s": time.process_time() - c, "output_ids": r.text,
                     "target": s.target[0]})
    return rows, time.perf_counter() - t0, time.process_time() - c0


def measure(model: str, samples: list[Any], chunk: int, extra: dict[str, Any], repeats: int
            ) -> dict[bool, tuple[list[dict[str, Any]], float, float]]:
    """Cold and warm passes, alternating, ``repeats`` times each; per sample the fastest pass's timings (a shared
    machine's noise only ever adds time), and the fastest pass's wall and CPU seconds."""
    backends = {reuse: backend_for(model, reuse, chunk, extra) for reuse in (False, True)}
    passes: dict[bool, list[tuple[list[dict[str, Any]], float, float]]] = {False: [], True: []}
    for _ in range(repeats):
        for reuse, backend in backends.items():
            passes[reuse].append(run(backend, samples))
    for backend in backends.values():
        backend.close()
    out = {}
    for reuse, got in passes.items():
        rows = [dict(r) for r in got[0][0]]
        for i, row in enumerate(rows):
            assert len({p[0][i]["output_ids"] for p in got}) == 1, "an answer changed between passes"
            for key in ("ttft_s", "latency_s", "cpu_s"):
                row[key] = min(p[0][i][key] for p in got)
        out[reuse] = (rows, min(p[1] for p in got), min(p[2] for p in got))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096])
    ap.add_argument("--depths", type=int, default=11, help="linear depths 0..1 (default 11)")
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--mode", default="raw", choices=["raw", "chat"])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--ignore-eos", action="store_true", help="decode the whole budget (more answer ids compared)")
    ap.add_argument("--repeats", type=int, default=1, help="passes per configuration; the fastest counts")
    ap.add_argument("--out", default="bench_prefix_reuse_out")
    args = ap.parse_args()
    import pandas as pd
    import torch

    extra: dict[str, Any] = {"threads": args.threads} if args.threads else {}
    if args.ignore_eos:
        extra["ignore_eos"] = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    lines = []
    for length in args.lengths:
        samples = sweep(args.model, length, args.depths, args.mode)
        got = measure(args.model, samples, args.chunk, extra, args.repeats)
        (cold, wall_c, cpu_c), (warm, wall_w, cpu_w) = got[False], got[True]
        rows += cold + warm
        naive = sum(s.context_length for s in samples)
        computed = sum(length - r["n_cached_prompt_tokens"] for r in warm)
        ideal = computed_tokens([s.prompt_ids for s in samples])
        same = sum(a["output_ids"] == b["output_ids"] for a, b in zip(cold, warm))
        pre_c, pre_w = sum(r["ttft_s"] for r in cold), sum(r["ttft_s"] for r in warm)
        lines.append(f"{length:>8} | {len(samples)} depths | tokens computed {computed:,} of {naive:,} = "
                     f"{computed / naive:.3f}x (ideal {ideal / naive:.3f}x) | prefill (sum of TTFT) {pre_w:.3f} s of "
                     f"{pre_c:.3f} s = {pre_w / pre_c:.3f}x | sweep wall {wall_w:.3f} s of {wall_c:.3f} s = "
                     f"{wall_w / wall_c:.3f}x | sweep CPU {cpu_w:.2f} s of {cpu_c:.2f} s = {cpu_w / cpu_c:.3f}x | "
                     f"same answer ids {same}/{len(samples)}")
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    df = pd.DataFrame(rows)
    df.to_csv(out / "bench_prefix_reuse.csv", index=False)
    cuda = torch.cuda.is_available()
    dev = f"{torch.cuda.get_device_name(0)}" if cuda else f"CPU ({platform.processor() or platform.machine()}, " \
        f"{torch.get_num_threads()} threads)"
    print(f"machine: {platform.node()} | {dev} | torch {torch.__version__} | model {args.model} | chunk {args.chunk} "
          f"| {args.mode}")
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.4f}".format):
        print(df.to_string(index=False))
    print("\n".join(lines))
    (out / "summary.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
