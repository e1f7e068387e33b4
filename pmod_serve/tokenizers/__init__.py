"""Like `vllm.tokenizers`: tokenizer mode `pmod` and the released prompt encoding."""
