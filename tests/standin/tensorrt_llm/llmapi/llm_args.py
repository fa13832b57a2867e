"""Stand-in for tensorrt_llm.llmapi.llm_args: the field names of TorchLlmArgs evalctx may pass (pydantic).

As in the newest llm_args.py, ``fail_fast_on_attention_window_too_large`` is a TrtLlmArgs (engine backend) field
only: TorchLlmArgs lacks it, and the PyTorch KV cache manager shrinks the attention window instead.
"""


class TorchLlmArgs:
    model_fields = dict.fromkeys([
        "model", "tokenizer", "tokenizer_mode", "skip_tokenizer_init", "trust_remote_code", "dtype", "revision",
        "tensor_parallel_size", "pipeline_parallel_size", "context_parallel_size", "gpus_per_node",
        "kv_cache_config", "enable_chunked_prefill", "max_batch_size", "max_input_len", "max_seq_len",
        "max_beam_width", "max_num_tokens", "return_perf_metrics", "enable_iter_perf_stats", "enable_iter_req_stats",
        "enable_lora", "lora_config", "cuda_graph_config", "attn_backend", "disable_overlap_scheduler",
    ])
