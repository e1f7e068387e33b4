"""Like `vllm.transformers_utils.configs`: the `pmod_llava_llama` config type."""
