"""Stand-in for the one helper of tensorrt_llm.runtime.model_runner that LoRA loading uses."""

from types import SimpleNamespace


def _engine_config_to_model_config(engine_config, **kwargs):
    return SimpleNamespace(engine_config=engine_config, **kwargs)
