"""Like `vllm.model_executor.models`: `pmod_llava` (the model) and `config` (its per-architecture config hook)."""
