"""The plain-PyTorch p-MoD-LLaVA reference (`pmod_reference.model`): docs/p-mod.md turned into
code, the oracle the vLLM model is tested and benchmarked against, token for token.

Part of the repository, not of the `pmod-serve` wheel (pyproject's package discovery leaves it
out): tests, benchmarks and `pmod_train` import it from a clone. It shares the p-MoD rules
(`pmod_serve.pmod`), the image pixels, the prompt encoding and the checkpoint registry with the
served model, and imports nothing from vLLM (tests/test_layout.py checks both).
"""
