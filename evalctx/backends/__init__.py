"""The engines behind one protocol (:mod:`.base`: ``Backend.generate(batch)`` and the registry of names): the
fake backend for tests, evalctx's own engine on transformers (:mod:`.hf`), TensorRT-LLM (:mod:`.trtllm`), and
OpenAI-compatible servers (:mod:`.openai_http` with :mod:`.http_client`, :mod:`.http_servers`,
:mod:`.http_probes` and :mod:`.http_length_check`)."""
