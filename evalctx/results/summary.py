"""Per-cell summaries of a results DataFrame: counts, accuracy with a Wilson 95% interval, latency percentiles.

Latency percentiles are over cold rows only: a row whose prompt came partly from a KV cache (hf ``prefix_reuse``,
a server's prefix cache, TensorRT-LLM block reuse) timed the prefill of its suffix, not of its prompt, so its TTFT
and latency would read as a faster model. ``n_warm`` counts the scored rows left out for that reason.
"""

from __future__ import annotations

from typing import Sequence

import pandas as pd

from evalctx.stats import wilson_interval

DEFAULT_BY: tuple[str, ...] = ("task", "context_length", "depth")

SUMMARY_COLUMNS = [
    "n", "n_error", "n_unsupported", "accuracy", "ci_low", "ci_high",
    "latency_s_p50", "latency_s_p95", "ttft_s_p50", "prefill_tokens_per_s_p50", "n_empty",
    "n_flagged", "n_warm", "depth_actual_mean",
]


def warm_rows(df: pd.DataFrame) -> pd.Series:
    """Rows whose prompt came partly from a KV cache: ``n_cached_prompt_tokens`` > 0, or the flag
    ``kv_cache_reuse`` (a reuse whose count is unknown). Rows that say neither (older runs, servers that do not
    report their cache) count as cold."""
    warm = pd.Series(False, index=df.index)
    if "n_cached_prompt_tokens" in df:
        warm |= pd.to_numeric(df["n_cached_prompt_tokens"], errors="coerce").fillna(0) > 0
    if "flags" in df:
        warm |= pd.Series([f is not None and "kv_cache_reuse" in list(f) for f in df["flags"]], index=df.index)
    return warm


def _n_flagged(rows: pd.DataFrame) -> int:
    """Scored rows that carry at least one flag (see :data:`evalctx.records.FLAGS`)."""
    if "flags" not in rows:
        return 0
    return int(sum(1 for f in rows["flags"] if f is not None and len(f) > 0))


def summarize(df: pd.DataFrame, by: Sequence[str] = DEFAULT_BY) -> pd.DataFrame:
    """One row per group. Accuracy is the mean score over scored (status ok) rows only: error and unsupported
    rows are counted apart and never scored as wrong; ``n`` is the number of scored rows. Latency, TTFT and
    prefill throughput are over the cold scored rows (NaN when all are warm); ``n_warm`` is the rest."""
    by = [c for c in by if c in df.columns]
    rows = []
    for key, g in df.groupby(by, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        ok = g[g["status"] == "ok"]
        n = int(len(ok))
        total = float(ok["score"].sum()) if n else 0.0
        lo, hi = wilson_interval(total, n)
        warm = warm_rows(ok)
        cold = ok[~warm]
        lat = cold["latency_s"].dropna()
        ttft = cold["ttft_s"].dropna() if "ttft_s" in cold else pd.Series(dtype=float)
        pre = cold["prefill_tokens_per_s"].dropna() if "prefill_tokens_per_s" in cold else pd.Series(dtype=float)
        comp = ok["completion"].fillna("") if "completion" in ok else pd.Series(dtype=str)
        rows.append({
            **dict(zip(by, key)),
            "n": n,
            "n_error": int((g["status"] == "error").sum()),
            "n_unsupported": int((g["status"] == "unsupported").sum()),
            "accuracy": total / n if n else float("nan"),
            "ci_low": lo,
            "ci_high": hi,
            "latency_s_p50": float(lat.median()) if len(lat) else float("nan"),
            "latency_s_p95": float(lat.quantile(0.95)) if len(lat) else float("nan"),
            "ttft_s_p50": float(ttft.median()) if len(ttft) else float("nan"),
            "prefill_tokens_per_s_p50": float(pre.median()) if len(pre) else float("nan"),
            "n_empty": int((comp.str.strip() == "").sum()),
            "n_flagged": _n_flagged(ok),
            "n_warm": int(warm.sum()),
            # Where the first needles actually went (a needle sits at the sentence boundary nearest its depth).
            "depth_actual_mean": float(ok["depth_actual"].mean()) if "depth_actual" in ok and n else float("nan"),
        })
    return pd.DataFrame(rows, columns=[*by, *SUMMARY_COLUMNS])
