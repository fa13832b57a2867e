"""What fits: whether a suite fits the machine running evalctx and a context length fits an engine and a GPU,
before any GPU work. :mod:`.limits` bounds a suite's size (samples, depths, prompt memory) when it loads;
:mod:`.engine_config` reads TensorRT-LLM engine configs; :mod:`.preflight` what an engine or model cannot see
(max_seq_len, windows, KV capacity: ``unsupported`` rows); :mod:`.kv_layout`, :mod:`.memory` and :mod:`.plan` the
memory arithmetic (weights, KV cache per layer kind and precision, activations) behind the hf preflight and
``evalctx plan``; :mod:`.dtypes` the dtype spellings."""
