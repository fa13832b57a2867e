"""How long does building one exact-length sample take, compared with one plain tokenization of its prompt?

    python benchmarks/bench_generate.py [--tokenizer DIR] [--lengths 32768,131072,1048576] [--tasks passkey,...]

Without ``--tokenizer`` it builds (locally, no downloads) a byte-level BPE with a Llama-3-style pre-tokenizer, trained
on the shipped essays with a 32K vocabulary target. For each length it prints the cold build (the filler stream
tokenized for the first time), the warm build (stream cached), one ``tokenizer.encode`` of the same final prompt,
and warm/encode -- the target is <= 2x: the verification tokenization is the one unavoidable full pass.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from evalctx.tasks import get_task  # noqa: E402
from evalctx.tasks import haystack as haystack_mod  # noqa: E402
from evalctx.tasks import placement  # noqa: E402
from evalctx.models.tokenizer import HFTokenizer, Tokenizer  # noqa: E402


def stdlib_text(limit_bytes: int) -> list[str]:
    """Python's own standard library sources: megabytes of English docstrings and code on every machine."""
    root = Path(os.__file__).parent
    out, total = [], 0
    for p in sorted(root.glob("*.py")):
        t = p.read_text(encoding="utf-8", errors="ignore")
        out.append(t)
        total += len(t)
        if total >= limit_bytes:
            break
    return out


def default_tokenizer(vocab_size: int) -> tuple[Tokenizer, str]:
    from tokenizer_fixtures import save_hf, training_text

    folder = Path(tempfile.mkdtemp(prefix="evalctx-bench-tok-"))
    # The essays alone hold too few distinct words for a realistic vocabulary; the stdlib adds enough.
    save_hf("bpe_llama3", folder, training_text() + stdlib_text(6_000_000), vocab_size=vocab_size)
    tok = HFTokenizer(folder)
    return tok, f"byte-level BPE (Llama-3 regex) trained on the essays + Python stdlib, vocab {len(tok.hf)}"


def clear_caches() -> None:
    """Forget every tokenized filler stream and the seam calibration: the next build is cold."""
    for h in haystack_mod._CACHE.values():
        h._streams.clear()
    haystack_mod._CACHE.clear()
    placement._RESIDUAL.clear()
    placement._SPECIAL.clear()


_VERIFS: list[int] = []
_assemble = placement.assemble


def _counting_assemble(*a, **k):  # type: ignore[no-untyped-def]
    out = _assemble(*a, **k)
    _VERIFS.append(out.verifications)
    return out


placement.assemble = _counting_assemble  # record how many full tokenizations each build needed


def timed(fn):  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", help="a Hugging Face tokenizer directory (default: build one locally)")
    ap.add_argument("--vocab-size", type=int, default=32000)
    ap.add_argument("--lengths", default="32768,131072,1048576")
    ap.add_argument("--tasks", default="passkey,niah_single:essay",
                    help="comma list of task[:haystack]")
    ap.add_argument("--mode", default="raw", choices=["raw", "chat"])
    args = ap.parse_args()

    print(f"machine: {platform.platform()}, python {platform.python_version()}, {os.cpu_count()} CPUs "
          f"({platform.processor() or platform.machine()})")
    if args.tokenizer:
        tok: Tokenizer = HFTokenizer(args.tokenizer)
        what = args.tokenizer
    else:
        (tok, what), secs = timed(lambda: default_tokenizer(args.vocab_size))
        what += f" (built in {secs:.1f} s)"
    print(f"tokenizer: {what}")
    lengths = [int(x) for x in args.lengths.split(",")]
    header = (f"{'task':<22}{'length':>9}{'cold s':>9}{'warm s':>9}{'encode s':>10}{'warm/enc':>10}"
              f"{'cold/enc':>10}{'verifs':>8}")
    print(header)
    print("-" * len(header))
    for spec in args.tasks.split(","):
        name, _, hay = spec.partition(":")
        options = {"haystack": hay} if hay else {}
        for length in lengths:
            clear_caches()
            task = get_task(name)(tok, options, args.mode)
            _, cold = timed(lambda: task.make_sample(length, 0.5, seed=1))
            # Warm: another seed and depth (new key, new layout), the filler stream already tokenized.
            sample, warm = timed(lambda: task.make_sample(length, 0.25, seed=2))
            assert len(sample.prompt_ids) == length
            ids, enc = timed(lambda: tok.encode(sample.prompt, add_special_tokens=sample.add_special_tokens))
            assert ids == sample.prompt_ids
            verifs = str(_VERIFS[-1])
            label = f"{name}:{hay}" if hay else name
            print(f"{label:<22}{length:>9}{cold:>9.3f}{warm:>9.3f}{enc:>10.3f}{warm / enc:>10.2f}"
                  f"{cold / enc:>10.2f}{verifs:>8}")


if __name__ == "__main__":
    main()
