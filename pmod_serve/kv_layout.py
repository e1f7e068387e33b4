"""Which prompt tokens a p-MoD layer may skip, and how many KV slots that leaves.

This arithmetic is shared by the scheduler side (block allocation) and the worker side
(compacted attention metadata and slot mappings), so both agree on every layer's compacted
token count. The counts depend only on the request (its visual spans) and the layer's
retention ratio; *which* visual tokens are kept is decided inside the forward pass and does
not change any count.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pmod_serve.config import PmodSchedule, kept_target_count

# Each image's base (global) view comes first in the anyres layout: 24 x 24 CLIP features.
BASE_IMAGE_TOKENS = 576


@dataclass(frozen=True)
class TargetPolicy:
    """Which tokens of a request are routing targets (spec §2, `mod_target_token_type`)."""

    target_token_type: str
    anyres: bool

    @classmethod
    def from_config(cls, hf_config: Any) -> TargetPolicy:
        schedule = PmodSchedule.from_config(hf_config)
        return cls(
            target_token_type=schedule.target_token_type,
            anyres=getattr(hf_config, "image_aspect_ratio", None) == "anyres",
        )

    def request_targets(
        self, image_spans: Sequence[tuple[int, int]], num_prompt_tokens: int
    ) -> RequestTargets:
        """`image_spans` are (offset, length) of each image's visual tokens in the prompt."""
        if not image_spans:
            # A sequence without images is never routed.
            return RequestTargets(())
        if self.target_token_type == "all":
            return RequestTargets(((0, num_prompt_tokens),))
        skip_base = self.target_token_type == "vision_hr" and self.anyres
        ranges = []
        for offset, length in sorted(image_spans):
            start = offset + BASE_IMAGE_TOKENS if skip_base else offset
            if start < offset + length:
                ranges.append((start, offset + length))
        return RequestTargets(tuple(ranges))

    def targets_of(self, mm_features: Iterable[Any] | None, num_prompt_tokens: int) -> RequestTargets:
        """Targets of a vLLM request from its `mm_features` (`mm_position` = PlaceholderRange)."""
        spans = [
            (f.mm_position.offset, f.mm_position.length)
            for f in (mm_features or ())
            if f.modality == "image"
        ]
        return self.request_targets(spans, num_prompt_tokens)


@dataclass(frozen=True)
class RequestTargets:
    """Target token ranges `[start, end)` of one request, in prompt positions, sorted."""

    ranges: tuple[tuple[int, int], ...]

    # Cached: the KV managers read these per request, per layer group and per scheduler step.
    @functools.cached_property
    def num_targets(self) -> int:
        return sum(end - start for start, end in self.ranges)

    @functools.cached_property
    def span(self) -> tuple[int, int]:
        """First target position and one past the last: top-k needs all of it in one step."""
        if not self.ranges:
            return (0, 0)
        return (self.ranges[0][0], self.ranges[-1][1])

    def num_skipped(self, retention_ratio: float | None) -> int:
        """Target tokens a layer with this retention ratio never caches."""
        if retention_ratio is None or not self.ranges:
            return 0
        num_targets = self.num_targets
        return num_targets - kept_target_count(num_targets, retention_ratio)

    def compacted_length(self, num_tokens: int, retention_ratio: float | None) -> int:
        """KV slots a layer holds once the first `num_tokens` tokens have been fed."""
        skipped = self.num_skipped(retention_ratio)
        if skipped == 0:
            return num_tokens
        start, end = self.span
        if num_tokens >= end:
            return num_tokens - skipped
        if num_tokens <= start:
            return num_tokens
        raise ValueError(
            f"p-MoD: {num_tokens} tokens end inside the visual span [{start}, {end}); "
            "a request's visual tokens must be prefilled in one step"
        )
