"""The p-MoD rules (docs/p-mod.md): the layer schedule, the KV layout, the routing interface and the
image layout. Plain Python, NumPy and PyTorch: no vLLM import (tests/test_layout.py checks it)."""
