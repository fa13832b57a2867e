"""Synthetic run directories (manifest.json + results.parquet, or a journal only) for the analysis, report and gate
tests. Everything is deterministic from the arguments, so an identical call is an identical rerun."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from evalctx.records import SampleRecord

DEFAULT_ENGINE = {
    "dtype": "float16", "quant_algo": None, "kv_cache_quant_algo": None, "tp": 1, "pp": 1,
    "max_seq_len": 131082, "max_input_len": 131072, "max_num_tokens": 4096, "use_paged_context_fmha": True,
    "paged_kv_cache": True, "tokens_per_block": 64, "lora_plugin": None,
}


def _u(*parts: Any) -> float:
    """A stable uniform number in [0, 1) from the parts (independent of Python's hash seed)."""
    h = hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()
    return int(h[:12], 16) / float(1 << 48)


def make_rows(run_id: str, *, tasks: Sequence[str] = ("passkey", "niah_single"),
              lengths: Sequence[int] = (4096, 8192, 16384), depths: Sequence[float] = (0.0, 0.5, 1.0),
              samples: int = 20, seed: int = 0, base_accuracy: float = 1.0, miss_from: int | None = None,
              miss_rate: float = 0.6, latency_scale: float = 1.0, error_from: int | None = None,
              unsupported_from: int | None = None, label: str = "model-a",
              engine: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per sample. ``miss_from``: from that length on, a ``miss_rate`` fraction of needles is missed (the
    perturbation). ``error_from``/``unsupported_from``: from that length on, every sample is an error/unsupported
    row. Latency grows linearly with length, times ``latency_scale``."""
    rows = []
    for task in tasks:
        for length in lengths:
            for depth in depths:
                for i in range(samples):
                    sid = hashlib.sha1(f"{task}|{length}|{depth}|{seed}|{i}".encode()).hexdigest()[:16]
                    target = f"{int(_u(sid, 'key') * 90000) + 10000}"
                    hit = _u(sid, "hit") < base_accuracy
                    if miss_from is not None and length >= miss_from and _u(sid, "miss") < miss_rate:
                        hit = False
                    status, error, score, completion = "ok", None, (1.0 if hit else 0.0), \
                        (target if hit else "I don't know")
                    if error_from is not None and length >= error_from:
                        status, error, score, completion = "error", f"CUDA out of memory at {length} tokens", \
                            None, None
                    if unsupported_from is not None and length >= unsupported_from:
                        status, error, score, completion = "unsupported", \
                            f"prompt of {length} tokens exceeds max_input_len", None, None
                    ok = status == "ok"
                    jitter = 1.0 + 0.01 * _u(sid, "lat")
                    ttft = (0.02 + length * 2e-5) * latency_scale * jitter
                    latency = ttft + 0.03 * latency_scale
                    rec = SampleRecord(
                        run_id=run_id, sample_id=sid, task=task, context_length=length, depth=depth,
                        depth_actual=depth, seed=seed, prompt_mode="raw", needle_token_index=int(length * depth),
                        target=[target], completion=completion, extracted=target if hit and ok else None,
                        score=score, status=status, n_prompt_tokens=length, n_output_tokens=5 if ok else None,
                        latency_s=latency if ok else None, ttft_s=ttft if ok else None,
                        prefill_tokens_per_s=length / ttft if ok else None,
                        decode_tokens_per_s=5 / 0.03 if ok else None, batch_size=1,
                        finish_reason="length" if ok else None, peak_memory_bytes=None, error=error,
                        prompt_sha1=sid, scorer="first_int_match", max_new_tokens=6, replica=0,
                        finished_at=1_700_000_000.0 + len(rows),
                        extra={"meta_template": "trtllm"},
                    )
                    row = rec.to_row()
                    row.update({"label": label, "backend": "trtllm", "model": f"/engines/{label}"})
                    for k, v in (engine or DEFAULT_ENGINE).items():
                        row[f"engine_{k}"] = v
                    rows.append(row)
    return rows


def write_run(root: str | Path, run_id: str = "run-a", label: str = "model-a", *, status: str = "complete",
              created_at: str = "2026-01-01T02:00:00Z", engine: dict[str, Any] | None = None,
              journal_only: bool = False, duplicate_in_journal: bool = False, **row_options: Any) -> Path:
    """Write ``root/run_id`` as the runner would and return its path. ``row_options`` go to :func:`make_rows`."""
    run_dir = Path(root) / run_id
    (run_dir / "journal").mkdir(parents=True, exist_ok=True)
    engine = engine or DEFAULT_ENGINE
    rows = make_rows(run_id, label=label, engine=engine, **row_options)
    manifest = {
        "schema_version": 1, "run_id": run_id, "label": label, "status": status,
        "created_at": created_at, "finished_at": created_at.replace("02:00", "03:00"),
        "suite": {"name": "nightly", "tasks": [{"task": t} for t in row_options.get("tasks", ["passkey",
                                                                                             "niah_single"])]},
        "backend": {"backend": "trtllm", "model": f"/engines/{label}", "engine": engine,
                    "runtime": {"enable_chunked_context": True, "kv_cache_free_gpu_memory_fraction": 0.9},
                    "options": {}},
        "tokenizer": {"name": "meta-llama/Llama-3.1-8B", "fingerprint": "abc123"},
        "versions": {"python": "3.11.9", "evalctx": "0.1.0", "tensorrt_llm": "1.2.0"},
        "git_sha": "deadbeef", "host": "gpu-node-01", "gpus": ["NVIDIA H100 80GB HBM3"],
        "world": {"size": 1, "replicas": 1, "ranks_per_replica": 1},
        "command": "evalctx run --suite tasks/nightly.toml",
    }
    (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    journal_rows = [{k: v for k, v in r.items() if not k.startswith(("engine_", "label", "backend", "model"))}
                    for r in rows]
    if duplicate_in_journal and journal_rows:
        # An earlier failed attempt of the first sample, written before its successful retry.
        first = dict(journal_rows[0], status="error", score=None, error="transient", finished_at=1.0)
        journal_rows.insert(0, first)
    with (run_dir / "journal" / "rank0.jsonl").open("w") as fh:
        for r in journal_rows:
            fh.write(json.dumps(r) + "\n")
        if journal_only:
            fh.write('{"run_id": "half a line')  # killed mid-write
    if not journal_only:
        pd.DataFrame(rows).to_parquet(run_dir / "results.parquet", index=False)
    return run_dir
