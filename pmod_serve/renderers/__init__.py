"""Like `vllm.renderers`: the renderer of tokenizer mode `pmod`."""
