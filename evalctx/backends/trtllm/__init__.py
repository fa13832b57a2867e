"""TensorRT-LLM backends: ``trtllm`` (a prebuilt engine on the C++ executor) and its support modules.

Nothing heavy is imported here: ``tensorrt_llm`` is imported only when a backend is built.
"""
