"""Stand-in for the tensorrt_llm package (tests only; see tests/standin/README.md)."""

import os

__version__ = os.environ.get("EVALCTX_STANDIN_VERSION", "1.2.0")


def __getattr__(name):
    # The real package exports LLM and SamplingParams at the top level (the PyTorch-backend LLM API).
    if name in ("LLM", "SamplingParams"):
        from tensorrt_llm import llmapi

        return getattr(llmapi, name)
    raise AttributeError(name)
