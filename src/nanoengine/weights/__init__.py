"""Where weights come from and how they become a model: the registry, the pip fetch, GGUF conversion, quantization, loading."""
