"""The report's metadata tables, one column per run: the settings actually used (what ``auto`` resolved to, read
from the manifest's backend facts), the run's identity, and every engine field and option as given.

A row every run lacks is left out (an hf run has no engine KV-cache dtype, a server no rope facts), so the
settings table holds what applies to the runs shown.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import pandas as pd

from evalctx.models.model_facts import rope_facts, rope_text

Getter = Callable[[Mapping[str, Any]], Any]
Manifests = list[tuple[str, Mapping[str, Any]]]


def _at(m: Any, path: str) -> Any:
    for key in path.split("."):
        m = m.get(key) if isinstance(m, Mapping) else None
    return m


def _first(*paths: str) -> Getter:
    """The first of ``paths`` (dotted keys into the manifest) that holds a value."""
    def get(m: Mapping[str, Any]) -> Any:
        for p in paths:
            v = _at(m, p)
            if v not in (None, "", [], {}):
                return v
        return None
    return get


def _rope_scaling(m: Mapping[str, Any]) -> Any:
    mc = _at(m, "backend.model_config")
    return rope_text(rope_facts(mc)["rope_scaling"]) if isinstance(mc, Mapping) else None


def _rope_theta(m: Mapping[str, Any]) -> Any:
    """From the model config (rope_parameters under transformers 5), else a TensorRT-LLM engine's rotary_base."""
    mc = _at(m, "backend.model_config")
    theta = rope_facts(mc)["rope_theta"] if isinstance(mc, Mapping) else None
    theta = theta if theta is not None else _at(m, "backend.engine.rotary_base")
    return int(theta) if isinstance(theta, float) and theta.is_integer() else theta  # 10000, not "1e+04"


def _attention(m: Mapping[str, Any]) -> Any:
    impl, kernels = _at(m, "backend.attn_implementation"), _at(m, "backend.attention_kernels")
    return f"{impl} ({kernels})" if impl and kernels else impl


def _replicas(m: Mapping[str, Any]) -> Any:
    w = m.get("world")
    if not isinstance(w, Mapping) or w.get("replicas") is None:
        return None
    r, k = int(w["replicas"]), int(w.get("ranks_per_replica") or 1)
    return f"{r} replica{'s' * (r != 1)} of {k} rank{'s' * (k != 1)}"


def _per_task(key: str) -> Getter:
    """A suite field per task ("passkey: 8, niah_single: 12"), or once when every task has the same value."""
    def get(m: Mapping[str, Any]) -> Any:
        tasks = _at(m, "suite.tasks")
        if not isinstance(tasks, list) or not tasks:
            return None
        values = [(t.get("name") or t.get("task"), t.get(key)) for t in tasks if isinstance(t, Mapping)]
        if all(v is None for _, v in values):
            return None
        if len({str(v) for _, v in values}) == 1:
            return values[0][1]
        return ", ".join(f"{name}: {v}" for name, v in values)
    return get


def _chunked(m: Mapping[str, Any]) -> Any:
    on = _at(m, "backend.runtime.runtime_enable_chunked_context")
    if on is not None:
        return f"on (max_num_tokens {_at(m, 'backend.engine.max_num_tokens')})" if on else "off"
    size = _at(m, "backend.options.chunk_size") if _at(m, "backend.backend") == "hf" else None
    return f"{size} tokens per chunk" if size else None


def _server(m: Mapping[str, Any]) -> Any:
    s = _at(m, "backend.server")
    if not isinstance(s, Mapping) or not s.get("preset"):
        return None
    return " ".join(str(x) for x in (s.get("preset"), s.get("version")) if x)


# What ran, resolved: the hf backend's device/dtype/attention after "auto", TensorRT-LLM's engine fields, a
# server's preset and limits. (name, getter).
SETTINGS: list[tuple[str, Getter]] = [
    ("backend", _first("backend.backend")),
    ("model", _first("backend.model")),
    ("server", _server),
    ("device", _first("backend.device")),
    ("GPU", _first("backend.gpu", "gpus")),
    ("dtype", _first("backend.dtype", "backend.engine.dtype", "backend.llm_args.dtype")),
    ("weight quantization", _first("backend.engine.quant_algo")),
    ("KV cache dtype", _first("backend.engine.kv_dtype", "backend.kv_dtype")),
    ("KV cache layout", _first("backend.kv_layout")),
    ("attention", _attention),
    ("tensor parallel (tp)", _first("backend.tp", "backend.engine.tp", "backend.llm_args.tensor_parallel_size")),
    ("pipeline parallel (pp)", _first("backend.engine.pp", "backend.llm_args.pipeline_parallel_size")),
    ("replicas", _replicas),
    ("rope scaling", _rope_scaling),
    ("rope_theta", _rope_theta),
    ("max_position_embeddings", _first("backend.model_config.max_position_embeddings",
                                       "backend.engine.max_position_embeddings")),
    ("max_seq_len", _first("backend.runtime.runtime_max_seq_len", "backend.server.max_model_len")),
    ("attention window", _first("backend.runtime.runtime_attention_window")),
    ("chunked prefill", _chunked),
    ("KV cache block reuse", _first("backend.runtime.runtime_kv_cache_enable_block_reuse")),
    ("endpoint", _first("backend.endpoint")),
    ("sampling", _first("backend.sampling")),
    ("decoding", _first("backend.decoding")),
    ("end ids", _first("backend.end_ids")),
    ("chat template date", _first("chat_template.date")),
    ("default system turn", _first("chat_template.default_system_turn")),
    ("server identity", _first("identity")),
    ("batch size", _first("batch_size")),
    ("prompt mode", _per_task("prompt_mode")),
    ("max_new_tokens", _per_task("max_new_tokens")),
    ("tokenizer", _first("tokenizer.name")),
]

RUN_FIELDS: list[tuple[str, Getter]] = [
    ("run_id", _first("run_id")), ("status", _first("status")), ("stopped by", _first("stopped_by")),
    ("error_rate", _first("error_rate")), ("created_at", _first("created_at")),
    ("finished_at", _first("finished_at")), ("suite", _first("suite.name")), ("backend", _first("backend.backend")),
    ("model", _first("backend.model")), ("tokenizer", _first("tokenizer.name")),
    ("tokenizer fingerprint", _first("tokenizer.fingerprint")), ("versions", _first("versions")),
    ("git_sha", _first("git_sha")), ("host", _first("host")), ("gpus", _first("gpus")), ("world", _first("world")),
    ("command", _first("command")),
]


def side_by_side(manifests: Manifests, rows: Iterable[tuple[str, Getter]], drop_empty: bool = False) -> pd.DataFrame:
    """Rows = fields, one column per label; a "differs" column when several runs disagree. With ``drop_empty``,
    fields no run has are left out."""
    table: dict[str, list[Any]] = {"field": [], **{label: [] for label, _ in manifests}}
    for name, getter in rows:
        values = [getter(m) for _, m in manifests]
        if drop_empty and all(v in (None, "", [], {}) for v in values):
            continue
        table["field"].append(name)
        for (label, _), v in zip(manifests, values):
            table[label].append(v)
    df = pd.DataFrame(table)
    if len(manifests) > 1:
        df["differs"] = ["yes" if len({str(v) for v in r[1:]}) > 1 else "" for r in df.itertuples(index=False)]
    return df


def settings_table(manifests: Manifests) -> pd.DataFrame:
    """The settings actually used, per run (see :data:`SETTINGS`)."""
    return side_by_side(manifests, SETTINGS, drop_empty=True)


def run_table(manifests: Manifests) -> pd.DataFrame:
    return side_by_side(manifests, RUN_FIELDS)


def _given(part: str, key: str) -> Getter:
    """An engine field, runtime setting or option as given; an option left at ``auto`` shows what it resolved to
    where the backend recorded that under the same name (hf: dtype, device, attn_implementation)."""
    def get(m: Mapping[str, Any]) -> Any:
        backend = m.get("backend") or {}
        v = (backend.get(part) or {}).get(key)
        resolved = backend.get(key) if part == "options" and v == "auto" else None
        return f"auto → {resolved}" if resolved not in (None, "", "auto") else v
    return get


def options_table(manifests: Manifests) -> pd.DataFrame:
    """Every engine field, runtime setting and backend option of the runs, as given."""
    rows: list[tuple[str, Getter]] = []
    for part in ("engine", "runtime", "options"):
        keys: list[str] = []
        for _, m in manifests:
            for k in ((m.get("backend") or {}).get(part) or {}):
                if k not in keys:
                    keys.append(k)
        rows += [(f"{part}.{k}", _given(part, k)) for k in keys]
    return side_by_side(manifests, rows)
