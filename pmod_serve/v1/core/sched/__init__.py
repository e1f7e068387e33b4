"""Like `vllm.v1.core.sched`: the p-MoD scheduler."""
