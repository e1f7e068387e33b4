"""Like `vllm.v1.worker`: the p-MoD model runner, workers and block tables."""
