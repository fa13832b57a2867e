"""A TensorRT-LLM engine directory's ``config.json``, read into one typed record.

Two layouts exist and both are read:

* ``builder_config`` (TensorRT-LLM <= 0.7): ``{"builder_config": {...}, "plugin_config": {...}}`` with
  ``tensor_parallel``, ``precision`` and an integer ``quant_mode`` bit mask.
* ``pretrained_config`` (0.8 onwards, 1.x): ``{"version", "pretrained_config": {..., "mapping", "quantization"},
  "build_config": {..., "plugin_config": {...}}}``. Releases up to about 0.10 also carry ``max_output_len`` instead of
  ``max_seq_len``, ``pretrained_config.kv_dtype`` and a build-time ``plugin_config.multi_block_mode``.

Only this file is read (no tensorrt_llm import), so the harness can check an engine before any GPU work. Keys that
are missing fall back to the defaults of the release that wrote the file, and every such fallback is listed in
``defaults_used`` so the manifest says which facts were read and which were assumed.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from evalctx.errors import UsageError

CONFIG_NAME = "config.json"

# QuantMode bits of the builder_config era (tensorrt_llm/quantization/mode.py, IntFlag with auto() from 1).
_QM_INT4_WEIGHTS, _QM_INT8_WEIGHTS, _QM_ACTIVATIONS = 1, 2, 4
_QM_PER_GROUP, _QM_INT8_KV, _QM_FP8_KV, _QM_FP8_QDQ = 32, 64, 128, 256

# Fields that become engine_<name> columns of every results row (scalars only, so parquet keeps one type).
COLUMN_FIELDS = ("version", "architecture", "dtype", "quant_algo", "kv_cache_quant_algo", "tp", "pp", "cp",
                 "max_seq_len", "max_input_len", "max_num_tokens", "max_batch_size", "use_paged_context_fmha",
                 "paged_kv_cache", "tokens_per_block", "lora_plugin", "num_layers", "num_attention_heads",
                 "num_key_value_heads", "head_size", "hidden_size", "vocab_size")
_SHORT_DTYPE = {"float16": "fp16", "half": "fp16", "bfloat16": "bf16", "float32": "fp32", "float": "fp32"}


@dataclass(frozen=True)
class EngineConfig:
    """What evalctx needs to know about a built engine: limits, parallelism, quantization and model shape."""

    path: str
    """The engine directory."""
    layout: str
    """``pretrained_config`` (0.8+, 1.x) or ``builder_config`` (<= 0.7)."""
    version: str | None
    """TensorRT-LLM version that built the engine (top-level ``version``; absent in old layouts)."""
    architecture: str | None
    dtype: str | None
    """Activation/weight dtype as TensorRT-LLM spells it, e.g. ``float16``."""
    quant_algo: str | None
    """``FP8``, ``W8A16``, ``W4A16_AWQ``, ``NVFP4``, ... or None for unquantized weights."""
    kv_cache_quant_algo: str | None
    """``FP8``, ``INT8`` or None (KV cache in ``dtype``)."""
    tp: int
    pp: int
    cp: int
    gpus_per_node: int | None
    max_seq_len: int | None
    max_input_len: int | None
    """Build-time value; the runtime value passed to ``from_dir`` overrides it."""
    max_num_tokens: int | None
    """Tokens per engine step: the chunk size of chunked context, the prompt limit without it."""
    max_batch_size: int | None
    max_beam_width: int | None
    use_paged_context_fmha: bool
    paged_kv_cache: bool
    tokens_per_block: int
    context_fmha: bool | None
    remove_input_padding: bool | None
    lora_plugin: bool
    lora_dir: tuple[str, ...]
    max_lora_rank: int | None
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_size: int
    hidden_size: int
    intermediate_size: int | None
    vocab_size: int | None
    max_position_embeddings: int | None
    rotary_base: float | None
    tie_word_embeddings: bool
    multi_block_mode: bool | None
    """Build-time flag of releases up to about 0.11 (a runtime knob since); None where the file has none."""
    max_output_len: int | None
    """Build-time value of releases up to about 0.10; None in newer files."""
    position_embedding_type: str | None = None
    """``rope_gpt_neox``, ``learned_absolute``, ``alibi``, ... (TensorRT-LLM's PositionEmbeddingType names)."""
    defaults_used: tuple[str, ...] = field(default=())
    """Keys that were missing and took the writing release's default."""

    @property
    def world_size(self) -> int:
        """MPI ranks one engine instance needs: the runtime asserts the session size equals tp*pp*cp."""
        return self.tp * self.pp * self.cp

    @property
    def supports_chunked_context(self) -> bool:
        """Chunked context needs a paged KV cache and paged context FMHA; the runtime only warns when they lack."""
        return self.paged_kv_cache and self.use_paged_context_fmha

    @property
    def kv_dtype(self) -> str:
        """Short KV-cache dtype: ``fp8``/``int8`` when quantized, else the engine dtype (``fp16``, ``bf16``)."""
        if self.kv_cache_quant_algo:
            return self.kv_cache_quant_algo.lower()
        return short_dtype(self.dtype)

    @property
    def weight_dtype(self) -> str:
        """Short storage dtype of the linear-layer weights, as the planner counts bytes."""
        algo = (self.quant_algo or "").upper()
        if algo.startswith("FP8"):
            return "fp8"
        if algo.startswith(("W4", "NVFP4", "MIXED")) or "INT4" in algo:
            return "int4"
        if algo.startswith(("W8", "INT8")):
            return "int8"
        return short_dtype(self.dtype)

    def to_columns(self) -> dict[str, Any]:
        """Flat scalar ``engine_*`` columns for every results row (stable names and types for parquet)."""
        cols: dict[str, Any] = {"engine_dir": self.path, "engine_kv_dtype": self.kv_dtype}
        cols.update({f"engine_{name}": getattr(self, name) for name in COLUMN_FIELDS})
        return cols

    def to_manifest(self) -> dict[str, Any]:
        """Every field plus the derived facts, JSON-ready, for the run manifest."""
        d = dataclasses.asdict(self)
        d["lora_dir"] = list(self.lora_dir)
        d["defaults_used"] = list(self.defaults_used)
        d.update(world_size=self.world_size, kv_dtype=self.kv_dtype, weight_dtype=self.weight_dtype,
                 supports_chunked_context=self.supports_chunked_context)
        return d


def short_dtype(dtype: str | None) -> str:
    """``float16`` -> ``fp16``; unknown or missing dtypes default to fp16, the TensorRT-LLM default."""
    if not dtype:
        return "fp16"
    return _SHORT_DTYPE.get(str(dtype).lower(), str(dtype).lower())


def is_engine_config(data: Mapping[str, Any]) -> bool:
    """True for a TensorRT-LLM engine config.json (either layout), False for e.g. a Hugging Face config."""
    return "builder_config" in data or ("pretrained_config" in data and "build_config" in data)


def load_engine_config(path: str | Path) -> EngineConfig:
    """Read ``path`` (an engine directory or its config.json). Problems raise UsageError naming the file."""
    p = Path(path).expanduser()
    file = p / CONFIG_NAME if p.is_dir() or p.suffix != ".json" else p
    if not file.is_file():
        raise UsageError(
            f"engine config not found: {file} (pass the directory trtllm-build wrote, with config.json and rank*.engine)"
        )
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"{file}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except OSError as exc:
        raise UsageError(f"{file}: cannot read ({exc.strerror})") from None
    return parse_engine_config(data, file)


def parse_engine_config(data: Any, file: str | Path) -> EngineConfig:
    """Build an :class:`EngineConfig` from the decoded JSON of ``file`` (used in messages and as ``path``)."""
    file = Path(file)
    if not isinstance(data, dict) or not is_engine_config(data):
        raise UsageError(
            f"{file}: not a TensorRT-LLM engine config (expected pretrained_config + build_config, or builder_config)"
        )
    reader = _Reader(file)
    if "builder_config" in data:
        return _parse_builder_layout(data, reader)
    return _parse_pretrained_layout(data, reader)


class _Reader:
    """Typed lookups that turn a bad value into a UsageError naming the file and key, and log defaults taken."""

    def __init__(self, file: Path) -> None:
        self.file = file
        self.defaults: list[str] = []

    def section(self, data: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
        value = data.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise UsageError(f"{self.file}: {where}{key} must be an object, got {type(value).__name__}")
        return value

    def get_int(self, d: Mapping[str, Any], key: str, where: str, default: int | None = None,
            required: bool = False) -> int | None:
        value = d.get(key)
        if value is None:
            if required:
                raise UsageError(f"{self.file}: missing {where}{key}")
            if default is not None:
                self.defaults.append(f"{where}{key}={default}")
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < 0:
            raise UsageError(f"{self.file}: {where}{key} must be a non-negative integer, got {value!r}")
        return int(value)

    def get_bool(self, d: Mapping[str, Any], key: str, where: str, default: bool | None) -> bool | None:
        value = d.get(key)
        if value is None:
            if default is not None:
                self.defaults.append(f"{where}{key}={default}")
            return default
        if isinstance(value, bool):
            return value
        # trtllm-build takes enable/disable on the command line; some dumps keep those strings.
        text = str(value).strip().lower()
        if text in ("enable", "true", "1"):
            return True
        if text in ("disable", "false", "0"):
            return False
        raise UsageError(f"{self.file}: {where}{key} must be true or false, got {value!r}")

    @staticmethod
    def get_str(d: Mapping[str, Any], key: str) -> str | None:
        value = d.get(key)
        return None if value is None else str(value)


def _version_major(version: str | None) -> int | None:
    try:
        return int(str(version).split(".")[0])
    except (TypeError, ValueError):
        return None


def _plugin_enabled(value: Any) -> bool:
    """Plugins are stored as a dtype string when on and null/false/"disable" when off."""
    return value not in (None, False, "", "disable", "disabled", "None", "none")


def _paged_from_kv_cache_type(value: Any) -> bool | None:
    # How the KVCacheType enum serialises was not verified: accept "PAGED", "KVCacheType.PAGED" and the int 1.
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value == 1
    return "PAGED" in str(value).upper()


def _shape(r: _Reader, d: Mapping[str, Any], where: str, layers: str, heads: str, kv_heads: str) -> dict[str, Any]:
    num_heads = r.get_int(d, heads, where, required=True)
    hidden = r.get_int(d, "hidden_size", where, required=True)
    if not num_heads:
        raise UsageError(f"{r.file}: {where}{heads} must be positive")
    head_size = r.get_int(d, "head_size", where) or hidden // num_heads
    kv = d.get(kv_heads)
    num_kv = num_heads if kv is None else r.get_int(d, kv_heads, where)
    inter = next((r.get_int(d, k, where) for k in ("intermediate_size", "inter_size", "ffn_hidden_size") if k in d), None)
    rope = d.get("rotary_base")
    return dict(
        num_layers=r.get_int(d, layers, where, required=True),
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv,
        head_size=head_size,
        hidden_size=hidden,
        intermediate_size=inter,
        vocab_size=r.get_int(d, "vocab_size", where),
        max_position_embeddings=r.get_int(d, "max_position_embeddings", where),
        rotary_base=float(rope) if isinstance(rope, (int, float)) else None,
        tie_word_embeddings=bool(d.get("tie_word_embeddings") or d.get("share_embedding_table") or False),
        position_embedding_type=r.get_str(d, "position_embedding_type"),
    )


def _parse_pretrained_layout(data: dict[str, Any], r: _Reader) -> EngineConfig:
    pre = r.section(data, "pretrained_config", "")
    build = r.section(data, "build_config", "")
    plugin = r.section(build, "plugin_config", "build_config.")
    mapping = r.section(pre, "mapping", "pretrained_config.")
    quant = r.section(pre, "quantization", "pretrained_config.")
    lora = r.section(build, "lora_config", "build_config.")
    version = r.get_str(data, "version")
    # 1.x flipped two plugin defaults: paged context FMHA on and 32 tokens per block (0.x: off and 64).
    modern = (_version_major(version) or 0) >= 1
    P, B, M, PL = "pretrained_config.", "build_config.", "pretrained_config.mapping.", "build_config.plugin_config."

    kv_quant = r.get_str(quant, "kv_cache_quant_algo")
    legacy_kv = str(pre.get("kv_dtype") or "").lower()
    if kv_quant is None and legacy_kv in ("int8", "fp8"):
        kv_quant = legacy_kv.upper()
    paged = _paged_from_kv_cache_type(build.get("kv_cache_type"))
    if paged is None:
        paged = r.get_bool(plugin, "paged_kv_cache", PL, default=True)
    max_input_len = r.get_int(build, "max_input_len", B)
    max_output_len = r.get_int(build, "max_output_len", B)
    max_seq_len = r.get_int(build, "max_seq_len", B)
    if max_seq_len is None and max_input_len is not None and max_output_len is not None:
        max_seq_len = max_input_len + max_output_len  # <= 0.10 engines: the KV buffers were sized to this sum
        r.defaults.append(f"{B}max_seq_len=max_input_len+max_output_len")
    lora_dirs = lora.get("lora_dir") or []
    return EngineConfig(
        path=str(r.file.parent),
        layout="pretrained_config",
        version=version,
        architecture=r.get_str(pre, "architecture"),
        dtype=r.get_str(pre, "dtype"),
        quant_algo=r.get_str(quant, "quant_algo"),
        kv_cache_quant_algo=kv_quant,
        tp=r.get_int(mapping, "tp_size", M, default=1) or 1,
        pp=r.get_int(mapping, "pp_size", M, default=1) or 1,
        cp=r.get_int(mapping, "cp_size", M, default=1) or 1,
        gpus_per_node=r.get_int(mapping, "gpus_per_node", M),
        max_seq_len=max_seq_len,
        max_input_len=max_input_len,
        max_num_tokens=r.get_int(build, "max_num_tokens", B),
        max_batch_size=r.get_int(build, "max_batch_size", B),
        max_beam_width=r.get_int(build, "max_beam_width", B),
        use_paged_context_fmha=bool(r.get_bool(plugin, "use_paged_context_fmha", PL, default=modern)),
        paged_kv_cache=bool(paged),
        tokens_per_block=r.get_int(plugin, "tokens_per_block", PL, default=32 if modern else 64) or 64,
        context_fmha=r.get_bool(plugin, "context_fmha", PL, default=None),
        remove_input_padding=r.get_bool(plugin, "remove_input_padding", PL, default=None),
        lora_plugin=_plugin_enabled(plugin.get("lora_plugin")),
        lora_dir=tuple(str(x) for x in (lora_dirs if isinstance(lora_dirs, list) else [lora_dirs])),
        max_lora_rank=r.get_int(lora, "max_lora_rank", B + "lora_config."),
        multi_block_mode=r.get_bool(plugin, "multi_block_mode", PL, default=None),
        max_output_len=max_output_len,
        **_shape(r, pre, P, "num_hidden_layers", "num_attention_heads", "num_key_value_heads"),
        defaults_used=tuple(r.defaults),
    )


def _quant_from_mode(mode: int) -> tuple[str | None, str | None]:
    """Map the <= 0.7 QuantMode bit mask to the quant_algo / kv_cache_quant_algo names of later releases."""
    kv = "FP8" if mode & _QM_FP8_KV else "INT8" if mode & _QM_INT8_KV else None
    if mode & _QM_FP8_QDQ:
        algo: str | None = "FP8"
    elif mode & _QM_ACTIVATIONS:
        algo = "W8A8_SQ"
    elif mode & _QM_INT4_WEIGHTS:
        algo = "W4A16_GPTQ" if mode & _QM_PER_GROUP else "W4A16"
    elif mode & _QM_INT8_WEIGHTS:
        algo = "W8A16"
    else:
        algo = None
    return algo, kv


def _parse_builder_layout(data: dict[str, Any], r: _Reader) -> EngineConfig:
    bc = r.section(data, "builder_config", "")
    pc = r.section(data, "plugin_config", "")
    B, PL = "builder_config.", "plugin_config."
    algo, kv = _quant_from_mode(r.get_int(bc, "quant_mode", B, default=0) or 0)
    if bc.get("int8_kv_cache") and kv is None:
        kv = "INT8"
    max_input_len = r.get_int(bc, "max_input_len", B)
    max_output_len = r.get_int(bc, "max_output_len", B)
    max_seq_len = r.get_int(bc, "max_seq_len", B)
    if max_seq_len is None and max_input_len is not None and max_output_len is not None:
        max_seq_len = max_input_len + max_output_len
        r.defaults.append(f"{B}max_seq_len=max_input_len+max_output_len")
    shape = _shape(r, bc, B, "num_layers", "num_heads", "num_kv_heads")
    if bc.get("multi_query_mode"):
        shape["num_key_value_heads"] = 1  # the pre-GQA spelling of a single KV head
    return EngineConfig(
        path=str(r.file.parent),
        layout="builder_config",
        version=r.get_str(bc, "tensorrt_llm_version") or r.get_str(data, "version"),
        architecture=r.get_str(bc, "name"),
        dtype=r.get_str(bc, "precision"),
        quant_algo=algo,
        kv_cache_quant_algo=kv,
        tp=r.get_int(bc, "tensor_parallel", B, default=1) or 1,
        pp=r.get_int(bc, "pipeline_parallel", B, default=1) or 1,
        cp=1,
        gpus_per_node=r.get_int(bc, "gpus_per_node", B),
        max_seq_len=max_seq_len,
        max_input_len=max_input_len,
        max_num_tokens=r.get_int(bc, "max_num_tokens", B),
        max_batch_size=r.get_int(bc, "max_batch_size", B),
        max_beam_width=r.get_int(bc, "max_beam_width", B),
        use_paged_context_fmha=bool(r.get_bool(pc, "use_paged_context_fmha", PL, default=False)),
        paged_kv_cache=bool(r.get_bool(pc, "paged_kv_cache", PL, default=False)),
        tokens_per_block=r.get_int(pc, "tokens_per_block", PL, default=64) or 64,
        context_fmha=r.get_bool(pc, "context_fmha", PL, default=None),
        remove_input_padding=r.get_bool(pc, "remove_input_padding", PL, default=None),
        lora_plugin=_plugin_enabled(pc.get("lora_plugin")),
        lora_dir=(),
        max_lora_rank=r.get_int(bc, "max_lora_rank", B),
        multi_block_mode=r.get_bool(pc, "multi_block_mode", PL, default=None),
        max_output_len=max_output_len,
        **shape,
        defaults_used=tuple(r.defaults),
    )
