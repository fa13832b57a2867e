"""Stand-in for tensorrt_llm.builder.EngineConfig (LoRA loading reads it)."""

import json
from pathlib import Path
from types import SimpleNamespace


class EngineConfig(SimpleNamespace):
    @classmethod
    def from_json_file(cls, path):
        data = json.loads(Path(path).read_text())
        return cls(pretrained_config=data["pretrained_config"], build_config=data["build_config"])
