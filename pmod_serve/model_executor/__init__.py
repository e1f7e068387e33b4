"""Like `vllm.model_executor`: the vLLM model of p-MoD-LLaVA."""
