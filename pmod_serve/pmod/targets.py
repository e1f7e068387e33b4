"""Which tokens of a request are routing targets (docs/p-mod.md, "Config keys":
`mod_target_token_type`): the policy a checkpoint's config gives, and the target ranges of one
request, which the KV layout (`kv_layout.py`), the scheduler and the runner all start from.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pmod_serve.pmod.image_layout import ImageLayout
from pmod_serve.pmod.schedule import PmodSchedule, kept_target_count


@dataclass(frozen=True)
class TargetPolicy:
    """Which tokens of a request are routing targets (docs/p-mod.md, "Config keys": `mod_target_token_type`)."""

    target_token_type: str
    anyres: bool
    # Tokens of an anyres image's base (global) view, which comes first: one CLIP crop's features.
    base_image_tokens: int

    @classmethod
    def from_config(cls, hf_config: Any, layout: ImageLayout) -> TargetPolicy:
        schedule = PmodSchedule.from_config(hf_config)
        return cls(
            target_token_type=schedule.target_token_type,
            anyres=layout.is_anyres,
            base_image_tokens=layout.tokens_per_crop,
        )

    def request_targets(
        self, image_spans: Sequence[tuple[int, int]], num_prompt_tokens: int
    ) -> RequestTargets:
        """`image_spans` are (offset, length) of each image's visual tokens in the prompt."""
        if not image_spans:
            # A sequence without images is never routed.
            return RequestTargets(())
        images = tuple((offset, offset + length) for offset, length in sorted(image_spans))
        if self.target_token_type == "all":
            return RequestTargets(((0, num_prompt_tokens),), images)
        skip_base = self.target_token_type == "vision_hr" and self.anyres
        ranges = []
        for offset, length in sorted(image_spans):
            start = offset + self.base_image_tokens if skip_base else offset
            if start < offset + length:
                ranges.append((start, offset + length))
        return RequestTargets(tuple(ranges), images)

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
    # `[start, end)` of every image's visual tokens (they may start before its targets).
    images: tuple[tuple[int, int], ...] = ()

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

    def resumable(self, num_tokens: int) -> int:
        """The largest token count <= `num_tokens` a request may resume from (a prefix-cache hit):
        never inside the visual span (top-k needs all of it in one step), nor inside an image."""
        start, end = self.span
        if start < num_tokens < end:
            num_tokens = start
        for image_start, image_end in self.images:
            if image_start < num_tokens < image_end:
                num_tokens = image_start
        return num_tokens

    def num_skipped(self, retention_ratio: float | None) -> int:
        """Target tokens a layer with this retention ratio never caches."""
        if retention_ratio is None or not self.ranges:
            return 0
        num_targets = self.num_targets
        return num_targets - kept_target_count(num_targets, retention_ratio)
