"""``evalctx conformance``: does the hf engine answer exactly as the model itself?

Runs passkey prompts through evalctx's hf engine for every combination of chunk_size, prefix_reuse and batch size,
and through the model's own ``generate`` on the whole prompt (transformers, the same dtype and device), and prints
per combination and length how many answers are the same token for token and how far the first-token logits are
from the model's forward. Exit 0 when every cell matches, 1 when one differs, 2 on bad input.

``--model DIR`` checks your model (at lengths that cross its thresholds: sliding window, original RoPE window);
``--family NAME`` (or ``all``) builds small random-weight models of the families evalctx is verified on
(docs/model_families.md) and checks those. Under ``mpirun -n K`` with ``--backend-opt tp=K`` the engine runs
tensor-parallel and world rank 0 compares.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from evalctx.commands.argtypes import positive_int
from evalctx.errors import UsageError, require_extra

DEFAULT_CHUNK = "default"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("conformance", help="check that the hf engine answers as the model's own generate",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="a model directory (or an embedded name such as 'tiny')")
    which.add_argument("--family", help="comma-separated family names, or 'all': random-weight models built here")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the model's)")
    p.add_argument("--lengths", type=positive_int, nargs="+", default=None,
                   help="prompt lengths in tokens (default: both sides of the model's thresholds)")
    p.add_argument("--chunk-sizes", nargs="+", default=None, metavar="N|default",
                   help="chunk_size values; 0 = whole prompt, 'default' = the backend's default (default: 0, one "
                        "that crosses the smallest threshold mid-chunk, and default)")
    p.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 3])
    p.add_argument("--prefix-reuse", choices=("both", "on", "off"), default="both")
    p.add_argument("--max-new-tokens", type=positive_int, default=8)
    p.add_argument("--backend-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="other hf backend options (device, dtype, attn_implementation, tp, ...)")
    p.add_argument("--markdown", default=None, metavar="FILE", help="also write the matrix as a Markdown table")
    return p


def main(args: argparse.Namespace) -> int:
    require_extra("torch", "hf")
    require_extra("transformers", "hf")
    from evalctx.backends.base import parse_kv_flags, parse_options
    from evalctx.backends.hf import HFBackend
    from evalctx.run.dist import init_world

    if args.markdown and not Path(args.markdown).parent.is_dir():
        raise UsageError(f"--markdown {args.markdown}: the folder {Path(args.markdown).parent} does not exist")
    raw = parse_kv_flags(args.backend_opt)
    for key in ("chunk_size", "prefix_reuse"):
        if key in raw:
            raise UsageError(f"conformance: {key} is what it varies: use --chunk-sizes / --prefix-reuse")
    if str(raw.get("kv_dtype", "auto")).lower() not in ("auto", "model"):
        raise UsageError("conformance checks the engine against the model, in the model's dtype; a quantized KV "
                         "cache differs by design: measure its cost with two evalctx runs (kv_dtype=auto and "
                         f"kv_dtype={raw['kv_dtype']}) and evalctx compare")
    base = parse_options(HFBackend, raw)
    world = init_world(HFBackend.ranks_per_replica(base, None))
    if world.n_replicas > 1:
        raise UsageError(f"conformance runs one replica: launch mpirun -n {world.ranks_per_replica}")
    rows: list[tuple[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="evalctx-conformance-") as tmp:
        for name, path in _models(args, Path(tmp), world):
            rows.extend((name, cell) for cell in _check(path, args, raw, world))
    if not world.is_root:
        return 0
    from evalctx.backends.hf.conformance import markdown

    table = markdown(rows)
    print(table)
    for name, cell in rows:
        for line in cell.differing[:3]:
            print(f"{name}, {cell.case.label()}, length {cell.length}: {line}", file=sys.stderr)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    bad = [(n, c) for n, c in rows if not c.ok]
    print(f"evalctx conformance: {len(rows) - len(bad)}/{len(rows)} cells match the model's own generate"
          + (f"; differing: {', '.join(sorted({n for n, _ in bad}))}" if bad else ""), file=sys.stderr)
    return 1 if bad else 0


def _models(args: argparse.Namespace, tmp: Path, world: Any) -> list[tuple[str, str]]:
    """(name, model dir) pairs: the given model, or the families built under ``tmp`` by world rank 0 (every rank
    of a tp replica shares the file system)."""
    if args.model:
        return [(args.model, args.model)]
    from evalctx.backends.hf import families

    names = [f.name for f in families.FAMILIES] if args.family == "all" else args.family.split(",")
    try:
        chosen = [families.by_name(n.strip()) for n in names]
    except ValueError as exc:
        raise UsageError(f"conformance: {exc}") from None
    tmp = Path(world.bcast_world(str(tmp)))
    if world.is_root:
        for f in chosen:
            families.build(f, tmp / f.name)
    world.bcast_world(None)  # the others wait until the models are written
    return [(f.name, str(tmp / f.name)) for f in chosen]


def _check(model: str, args: argparse.Namespace, raw: dict[str, str], world: Any) -> list[Any]:
    from transformers import AutoConfig

    from evalctx.backends.base import BackendContext, parse_options
    from evalctx.backends.hf import HFBackend
    from evalctx.backends.hf.conformance import Reference, compare, default_cases, sample_prompts
    from evalctx.backends.hf.families import LENGTHS
    from evalctx.models.embedded import resolve_model
    from evalctx.models.tokenizer import load_tokenizer

    resolved = resolve_model(model)
    tokenizer = load_tokenizer(args.tokenizer or model)

    def make_backend(case: Any) -> Any:
        opts = {**raw, "prefix_reuse": str(case.prefix_reuse).lower(), "chunk_size": str(case.chunk_size)}
        ctx = BackendContext(model=model, tokenizer=tokenizer, world_rank=world.rank, world_size=world.size,
                             replica_comm=world.replica_comm, rank_in_replica=world.rank_in_replica)
        return HFBackend(parse_options(HFBackend, opts), ctx)

    def make_reference(engine: Any) -> Reference:
        return Reference(str(resolved.path), engine.dtype, engine.device, engine.eos_ids)

    try:
        config = AutoConfig.from_pretrained(str(resolved.path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UsageError(f"conformance: cannot read a model config from {resolved.path}: {exc}".split("\n")[0])
    thresholds = model_thresholds(config)
    lengths = args.lengths or (list(LENGTHS) if args.family else default_lengths(thresholds))
    chunks = _chunks(args.chunk_sizes, thresholds, HFBackend.Options().chunk_size)
    reuse = {"both": [False, True], "on": [True], "off": [False]}[args.prefix_reuse]
    cases = default_cases(chunks, args.batch_sizes, reuse)
    prompts = {n: sample_prompts(tokenizer, n) for n in lengths}
    return compare(make_reference, make_backend, cases, lengths, args.max_new_tokens, prompts,
                   leader=world.is_root)


def model_thresholds(config: Any) -> list[int]:
    """Positions where the model's attention or rotation changes: sliding window, attention chunk, the original
    RoPE window (LongRoPE, YaRN, llama3, dynamic NTK's max_position_embeddings)."""
    from evalctx.models.model_facts import rope_facts

    text = getattr(config, "text_config", None) or config
    out = {getattr(text, "sliding_window", None), getattr(text, "attention_chunk_size", None),
           getattr(text, "original_max_position_embeddings", None)}
    scaling = rope_facts(text.to_dict())["rope_scaling"] or {}
    sets = list(scaling.values()) if all(isinstance(v, dict) for v in scaling.values()) else [scaling]
    for rp in sets:
        if not isinstance(rp, dict):
            continue
        out.add(rp.get("original_max_position_embeddings"))
        if "dynamic" in str(rp.get("rope_type", "")):
            out.add(getattr(text, "max_position_embeddings", None))
    return sorted(int(t) for t in out if isinstance(t, (int, float)) and t > 0)


def default_lengths(thresholds: list[int]) -> list[int]:
    """A length below the smallest threshold and one past the largest (the reference runs whole prompts: give
    --lengths to stay shorter), or 256 and 1024 for a model without thresholds."""
    if not thresholds:
        return [256, 1024]
    low, high = thresholds[0], thresholds[-1]
    return sorted({max(96, low * 3 // 4), high + max(64, high // 4)})


def _chunks(spec: list[str] | None, thresholds: list[int], default: int) -> list[int]:
    if spec is None:
        cross = max(16, (thresholds[0] * 3 // 8) if thresholds else 48)
        return sorted({0, cross, default})
    out = []
    for v in spec:
        if v == DEFAULT_CHUNK:
            out.append(default)
        elif v.isdigit():
            out.append(int(v))
        else:
            raise UsageError(f"conformance: --chunk-sizes takes integers >= 0 or 'default', got {v!r}")
    return sorted(set(out))
