"""Like `vllm.v1.metrics`: the pmod_kv_* Prometheus series."""
