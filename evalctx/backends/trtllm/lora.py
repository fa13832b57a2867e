"""LoRA adapters for the executor, loaded the way ``ModelRunnerCpp.from_dir`` loads them.

Followed: ``tensorrt_llm/runtime/model_runner_cpp.py`` at commit 03832911 (``LoraManager()`` and
``load_from_ckpt(..., runtime_mapping=None, ...)``; adapters stored in the engine are loaded with the engine's
``build_config.lora_config.lora_ckpt_source``) and the later version with
``fail_fast_on_attention_window_too_large`` (``LoraManager(mapping=..., model_config=...)``). Only the leader
(which alone enqueues) loads weights; adapter uids are the strings "0", "1", ... in ``lora_dir`` order, and each
request carries ``LoraConfig(task_id=int(uid), weights=..., config=...)``. The PEFT cache is sized as from_dir
sizes it: max_lora_rank x layers x modules x min(adapters, 8), on every rank of the replica.
These are internal TensorRT-LLM APIs: parameters are matched by ``inspect.signature``; never run on a real engine.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

from evalctx.capacity.engine_config import EngineConfig
from evalctx.errors import UsageError


CKPT_SOURCES = ("hf", "nemo")
"""``LoraConfig.lora_ckpt_source`` values (tensorrt_llm/lora_manager.py: Literal['hf', 'nemo'])."""


def stored_ckpt_source(engine: EngineConfig) -> str:
    """``build_config.lora_config.lora_ckpt_source`` of the engine's config.json ("hf" where it is absent, the
    builder's default): the format of the adapters trtllm-build stored in the engine dir."""
    try:
        data = json.loads((Path(engine.path) / "config.json").read_text())
        source = data["build_config"]["lora_config"].get("lora_ckpt_source") or "hf"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "hf"
    return str(source)


def adapter_dirs(engine: EngineConfig, lora_dir: list[str] | None, ckpt_source: str | None) -> tuple[list[str], str]:
    """(adapter folders, checkpoint format) to load, as ``ModelRunnerCpp.from_dir`` picks them.

    Given ``lora_dir``: those folders, in ``ckpt_source`` (default "hf", from_dir's default). Without: the adapters
    stored in the engine dir (``build_config.lora_config.lora_dir``) in the format the engine states
    (``build_config.lora_config.lora_ckpt_source``), which from_dir takes over whatever its caller passed; here a
    ``ckpt_source`` that contradicts it is refused instead of overridden silently.

    Raises UsageError: no adapters at all, an unknown format, or one that contradicts the engine's.
    """
    if ckpt_source is not None and ckpt_source not in CKPT_SOURCES:
        raise UsageError(f"lora_ckpt_source={ckpt_source!r} is not a LoRA checkpoint format: use hf or nemo")
    if lora_dir:
        return list(lora_dir), ckpt_source or "hf"
    if engine.lora_dir:
        stored = stored_ckpt_source(engine)
        if ckpt_source is not None and ckpt_source != stored:
            raise UsageError(f"lora_ckpt_source={ckpt_source} but the adapters stored in engine {engine.path} are "
                             f"{stored} checkpoints (build_config.lora_config.lora_ckpt_source): drop "
                             "--backend-opt lora_ckpt_source, or pass lora_dir=DIR for adapters of that format")
        return [str(Path(engine.path) / d) for d in engine.lora_dir], stored
    raise UsageError(f"engine {engine.path} has a LoRA plugin but no adapters: pass --backend-opt lora_dir=DIR[,DIR]")


def _accepts(fn: Any, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def load_manager(engine: EngineConfig, dirs: list[str], ckpt_source: str) -> tuple[Any, int]:
    """(LoraManager holding every adapter, PEFT cache size in module layers); leader only."""
    from tensorrt_llm.bindings import GptJsonConfig
    from tensorrt_llm.builder import EngineConfig as TrtEngineConfig
    from tensorrt_llm.runtime import generation
    from tensorrt_llm.runtime.model_runner import _engine_config_to_model_config

    config_file = Path(engine.path) / "config.json"
    init: dict[str, Any] = {}
    if _accepts(generation.LoraManager, "mapping"):
        from tensorrt_llm.mapping import Mapping

        init["mapping"] = Mapping(world_size=engine.world_size, rank=0, gpus_per_node=engine.gpus_per_node or 8,
                                  tp_size=engine.tp, pp_size=engine.pp, cp_size=engine.cp)
    if _accepts(generation.LoraManager, "model_config"):
        cpp_config = GptJsonConfig.parse_file(config_file).model_config
        init["model_config"] = generation.ModelConfig.from_model_config_cpp(cpp_config)
    manager = generation.LoraManager(**init)
    runtime_config = _engine_config_to_model_config(TrtEngineConfig.from_json_file(config_file))
    load: dict[str, Any] = dict(model_config=runtime_config, ckpt_source=ckpt_source)
    if _accepts(manager.load_from_ckpt, "runtime_mapping"):
        load["runtime_mapping"] = None
    manager.load_from_ckpt(dirs, **load)
    modules = engine.num_layers * len(list(manager.lora_target_modules) + list(manager.missing_qkv_modules))
    size = (engine.max_lora_rank or 0) * modules * min(int(manager.num_lora_adapters), 8)
    return manager, size


def request_config(trt: Any, manager: Any, uid: str | None) -> Any:
    """``LoraConfig`` for one request; None for no adapter (uid None or "-1")."""
    if uid is None or int(uid) < 0:
        return None
    if uid not in manager.cpp_lora_weights:
        raise KeyError(f"LoRA uid {uid!r} is not among the loaded adapters {sorted(manager.cpp_lora_weights)}")
    return trt.LoraConfig(task_id=int(uid), weights=manager.cpp_lora_weights[uid], config=manager.cpp_lora_config[uid])
