"""What the model runner tells the model about a step's routing: the one interface between the
engine hooks (`pmod_serve.v1.worker.model_runner`) and the model (`pmod_serve.model_executor.models.pmod_llava`), with no vLLM import."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pmod_serve.pmod.schedule import kept_target_count


@dataclass
class PmodRouting:
    """The target tokens of one step, for the model's p-MoD layers.

    Top-k is taken per routed request ("segment"). Everything the device needs is a tensor, so
    that a step's whole decoder can run as one compiled graph whatever the batch: the host-side
    `segments` are only for what cannot (per-request softmax router norms).
    """

    # Batch indices of target tokens, request after request, in position order: [T].
    target_index: torch.Tensor
    # Segment of each target: [T].
    target_segment: torch.Tensor
    # First target of each segment, plus one empty segment at the end (so that the number of
    # segments is never 1, a size torch.compile would specialise on): [S + 1].
    segment_start: torch.Tensor
    # Targets each layer keeps in each segment (`kept_target_count`; all for other layers): [layer, S + 1].
    kept_targets: torch.Tensor
    # Targets each layer skips in this step, on the host: the size of its kept-token set.
    num_skipped: Sequence[int]
    # `[start, end)` of each segment in `target_index`, on the host.
    segments: list[tuple[int, int]]


@dataclass
class RoutingPlan:
    """A step's routing on the host: what `PmodRouting` carries, as arrays (see its fields)."""

    target_segment: np.ndarray  # [T]
    segment_start: np.ndarray  # [S + 1]
    kept_targets: np.ndarray  # [layer, S + 1]
    num_skipped: list[int]  # [layer]
    segments: list[tuple[int, int]]

    @classmethod
    def of(cls, segment_lengths: Sequence[int], retention_ratios: Sequence[float | None]) -> RoutingPlan:
        """Routed requests with these target counts, in batch order, for layers with these
        retention ratios (None: a layer that keeps every token)."""
        lengths = np.asarray(segment_lengths, dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)])  # the last: the trailing empty segment
        kept_by_ratio = {
            ratio: np.array([*(length if ratio is None else kept_target_count(int(length), ratio) for length in lengths), 0],
                            dtype=np.int64)
            for ratio in set(retention_ratios)
        }
        kept_targets = np.stack([kept_by_ratio[ratio] for ratio in retention_ratios])
        return cls(
            target_segment=np.repeat(np.arange(len(lengths), dtype=np.int64), lengths),
            segment_start=starts,
            kept_targets=kept_targets,
            num_skipped=(int(starts[-1]) - kept_targets.sum(axis=1)).tolist(),
            segments=[(int(start), int(end)) for start, end in zip(starts[:-1], starts[1:])],
        )

    def routing(self, target_index: torch.Tensor) -> PmodRouting:
        """The device side, for batch indices of the targets already on the device (plain copies:
        the runner copies from pinned buffers instead)."""
        device = target_index.device
        return PmodRouting(
            target_index=target_index,
            target_segment=torch.from_numpy(self.target_segment).to(device),
            segment_start=torch.from_numpy(self.segment_start).to(device),
            kept_targets=torch.from_numpy(self.kept_targets).to(device),
            num_skipped=self.num_skipped,
            segments=self.segments,
        )
