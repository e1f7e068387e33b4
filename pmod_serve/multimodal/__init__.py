"""Like `vllm.multimodal`: image pixels and the media connector."""
