"""The shapes task and the tiny p-MoD-LLaVA trained on it (`checkpoints/`, the model of
`pmod-serve --demo`).

The wheel ships this package for its trained checkpoints (`paths`) and the demo picture
(`shapes`). Training (`train`, `forward`), routing maps (`routing_map`) and the `python -m
pmod_train` CLI are built on the plain-PyTorch reference (`pmod_reference`), which only a clone
of the repository has.
"""
