"""Like `vllm.entrypoints`: the `pmod-serve` CLI, the API-server guard, the serving config hook and the demo."""
