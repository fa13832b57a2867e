"""Stand-in for tensorrt_llm.bindings: the executor module and GptJsonConfig."""

import json
from pathlib import Path
from types import SimpleNamespace

from tensorrt_llm.bindings import executor  # noqa: F401


class GptJsonConfig:
    """Only what evalctx reads: runtime_defaults and model_config (for LoRA)."""

    def __init__(self, data):
        # Where a real config.json keeps them is the stand-in's assumption (pretrained_config.runtime_defaults);
        # evalctx never reads the file for them, only the KvCacheConfig they fill.
        rd = data["pretrained_config"].get("runtime_defaults")
        self.runtime_defaults = SimpleNamespace(max_attention_window=rd.get("max_attention_window"),
                                                sink_token_length=rd.get("sink_token_length")) if rd else None
        plugin = data["build_config"].get("plugin_config", {})
        self.model_config = SimpleNamespace(use_lora_plugin=bool(plugin.get("lora_plugin")),
                                            num_layers=data["pretrained_config"]["num_hidden_layers"])

    @staticmethod
    def parse_file(path):
        return GptJsonConfig(json.loads(Path(path).read_text()))
