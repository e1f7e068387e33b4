"""What the model runner tells the model about a step's routing: the one interface between the
engine hooks (`pmod_serve.v1.worker.model_runner`) and the model (`pmod_serve.model_executor.models.pmod_llava`), with no vLLM import."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PmodRouting:
    """The target tokens of one step, for the model's p-MoD layers.

    `target_index` holds batch indices of target tokens, request after request, in position
    order; `segments[i]` is the `[start, end)` slice of `target_index` of the i-th routed
    request (top-k is taken per request).
    """

    target_index: torch.Tensor
    segments: list[tuple[int, int]]
