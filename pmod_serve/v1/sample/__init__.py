"""Like `vllm.v1.sample`: the sampler and logits processors."""
