"""Stand-in for LoraManager and ModelConfig of tensorrt_llm.runtime.generation (newer constructor signature)."""

from pathlib import Path
from types import SimpleNamespace

LOADED = []


class ModelConfig(SimpleNamespace):
    @classmethod
    def from_model_config_cpp(cls, cpp):
        return cls(cpp=cpp)


class LoraManager:
    def __init__(self, *, mapping, model_config):
        self.mapping, self.model_config = mapping, model_config
        self.cpp_lora_weights, self.cpp_lora_config = {}, {}
        self.lora_target_modules, self.missing_qkv_modules = ["attn_q", "attn_k", "attn_v"], []
        self.num_lora_adapters = 0

    def load_from_ckpt(self, model_dirs_or_files, model_config, ckpt_source="hf"):
        for uid, folder in enumerate(model_dirs_or_files):
            if not Path(folder).is_dir():
                raise ValueError(f"{folder} is not a LoRA checkpoint folder")
            self.cpp_lora_weights[str(uid)] = f"weights:{folder}"
            self.cpp_lora_config[str(uid)] = f"config:{folder}"
        self.num_lora_adapters = len(model_dirs_or_files)
        LOADED.append((list(model_dirs_or_files), ckpt_source))
