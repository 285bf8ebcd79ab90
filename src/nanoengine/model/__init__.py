"""The model: its config, the decoder (one class per idea), the KV cache, the tokenizer, one file per family."""
