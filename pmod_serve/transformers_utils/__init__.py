"""Like `vllm.transformers_utils`: transformers-side definitions."""
