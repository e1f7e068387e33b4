"""Where the committed trained checkpoints live."""

from __future__ import annotations

from pathlib import Path

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
PMOD_CHECKPOINT = CHECKPOINTS / "shapes-pmod"
DENSE_CHECKPOINT = CHECKPOINTS / "shapes-dense"
