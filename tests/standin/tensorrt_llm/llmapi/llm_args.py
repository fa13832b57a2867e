"""Stand-in for tensorrt_llm.llmapi.llm_args: the field names of TorchLlmArgs evalctx may pass (pydantic)."""


class TorchLlmArgs:
    model_fields = dict.fromkeys([
        "model", "tokenizer", "tokenizer_mode", "skip_tokenizer_init", "trust_remote_code", "dtype", "revision",
        "tensor_parallel_size", "pipeline_parallel_size", "context_parallel_size", "gpus_per_node",
        "kv_cache_config", "enable_chunked_prefill", "max_batch_size", "max_input_len", "max_seq_len",
        "max_beam_width", "max_num_tokens", "return_perf_metrics", "fail_fast_on_attention_window_too_large",
        "enable_lora", "lora_config", "cuda_graph_config", "attn_backend", "disable_overlap_scheduler",
    ])
