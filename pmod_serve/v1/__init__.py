"""Like `vllm.v1`: engine hooks (scheduler and KV cache, workers and model runner, sampling, metrics)."""
