"""Like `vllm.v1.core`: scheduler and KV cache management, in the engine-core process."""
