"""p-MoD configuration: parsing the released `mod_*` keys into a per-layer schedule.

Pure Python (plus torch for the float32 arithmetic the released code uses), shared by the
plain-PyTorch reference, the vLLM model, the KV-cache manager and the model registry. docs/p-mod.md, "Config keys" and "Progressive ratio decay".
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

# The released code divides by 31 whatever the model depth.
PRD_PERIOD = 31

TARGET_TOKEN_TYPES = ("vision_all", "vision_hr", "all")
WEIGHT_NORMS = ("tanh", "sigmoid", "softmax", "none")


class PmodConfigError(ValueError):
    """A checkpoint's p-MoD keys cannot be interpreted."""


@dataclass(frozen=True)
class WeightNorm:
    """Router weight normalisation `w = scale * f(z) + bias` (docs/p-mod.md, "A p-MoD layer at prefill", step 2, TanhNorm)."""

    kind: str
    scale: float
    bias: float

    @classmethod
    def parse(cls, value: str) -> WeightNorm:
        parts = str(value).split("_")
        kind = parts[0]
        if kind not in WEIGHT_NORMS:
            raise PmodConfigError(
                f"unknown mod_weight_norm {value!r}: expected one of "
                f"{', '.join(WEIGHT_NORMS)}, optionally followed by _<scale>_<bias>"
            )
        if len(parts) == 1:
            return cls(kind, 1.0, 1.0)
        if len(parts) != 3:
            raise PmodConfigError(f"mod_weight_norm {value!r} must be '<kind>_<scale>_<bias>'")
        try:
            return cls(kind, float(parts[1]), float(parts[2]))
        except ValueError as exc:
            raise PmodConfigError(f"mod_weight_norm {value!r}: scale and bias must be numbers") from exc

    @property
    def elementwise(self) -> bool:
        """Whether `apply` treats every logit on its own (so several sequences can go at once)."""
        return self.kind != "softmax"

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Normalise the router logits of one sequence's target tokens (1-D)."""
        if self.kind == "tanh":
            normed = torch.tanh(logits)
        elif self.kind == "sigmoid":
            normed = torch.sigmoid(logits)
        elif self.kind == "softmax":
            normed = torch.softmax(logits, dim=-1)
        else:
            normed = logits
        return self.scale * normed + self.bias


def retention_ratios(target_layers: str, router_factor: float, num_layers: int) -> dict[int, float]:
    """Map each p-MoD layer index to its retention ratio; other layers are ordinary.

    `target_layers` is `mod_target_layers`: a PRD decay `"{shiftedcos|shiftedlinear}_decay_{max}_{min}"`
    or one of the fixed layouts `deep_all`, `deep_all_include_last`, `interleave`, whose layers all
    keep `router_factor` of their target tokens.
    """
    match = re.fullmatch(r"(shiftedcos|shiftedlinear)_decay_([0-9.]+)_([0-9.]+)", str(target_layers))
    if match:
        curve, max_ratio, min_ratio = match.group(1), float(match.group(2)), float(match.group(3))
        ratios = {}
        for layer in range(num_layers):
            if curve == "shiftedcos":
                ratio = math.cos(layer * math.pi / PRD_PERIOD) / 2 + router_factor
            else:
                ratio = (0.5 - layer / PRD_PERIOD) + router_factor
            if ratio <= max_ratio:
                ratios[layer] = max(ratio, min_ratio)
        return ratios
    if target_layers == "deep_all":
        layers = range(2, num_layers - 1)
    elif target_layers == "deep_all_include_last":
        layers = range(2, num_layers)
    elif target_layers == "interleave":
        layers = range(1, num_layers, 2)
    else:
        raise PmodConfigError(
            f"unknown mod_target_layers {target_layers!r}: expected "
            "'shiftedcos_decay_<max>_<min>', 'shiftedlinear_decay_<max>_<min>', "
            "'deep_all', 'deep_all_include_last' or 'interleave'"
        )
    return {layer: float(router_factor) for layer in layers}


@functools.lru_cache(maxsize=1 << 16)
def kept_target_count(num_targets: int, retention_ratio: float) -> int:
    """`trunc(T * ratio)` the way the released code computes it: an int32 tensor times a Python
    float, i.e. in float32. At T=2365 and layer 10's ratio (0.76448200...) the float32 product
    rounds to 1808.0 while float64 gives 1807.9999 -> 1807 (docs/p-mod.md, "A p-MoD layer at
    prefill", step 3; the task spec this project started from, ../shared/spec/p-mod.md, has the
    two swapped, while naming float32 as the mechanism, which is what is implemented and tested).

    Memoised: the KV managers ask for it per request, per layer group and per scheduler step, and
    one tensor round trip costs ~8 us."""
    if num_targets <= 0:
        return 0
    product = torch.tensor(num_targets, dtype=torch.int32) * retention_ratio
    return int(product.item())


@dataclass(frozen=True)
class PmodSchedule:
    """Everything the p-MoD computation needs to know from a checkpoint's config."""

    num_layers: int
    # layer index -> retention ratio, for p-MoD layers only
    retention_ratio: Mapping[int, float]
    weight_norm: WeightNorm
    target_token_type: str
    router_bias: bool

    @classmethod
    def from_config(cls, config: Any) -> PmodSchedule:
        """Build from an HF config object or a plain dict (config.json)."""
        get = config.get if isinstance(config, Mapping) else (lambda k, d=None: getattr(config, k, d))
        num_layers = get("num_hidden_layers")
        if num_layers is None:
            text_config = get("text_config")
            num_layers = getattr(text_config, "num_hidden_layers", None)
        if not isinstance(num_layers, int) or num_layers <= 0:
            raise PmodConfigError("config has no positive integer num_hidden_layers")
        target_layers = get("mod_target_layers")
        if target_layers is None:
            raise PmodConfigError("config has no mod_target_layers: not a p-MoD checkpoint")
        factor = get("mod_router_factor", 0.5)
        ratios = retention_ratios(target_layers, float(factor), num_layers)
        explicit = get("mod_target_layer_indices")
        if explicit is not None and sorted(int(i) for i in explicit) != sorted(ratios):
            raise PmodConfigError(
                f"mod_target_layer_indices {list(explicit)} disagrees with the layers "
                f"{sorted(ratios)} that mod_target_layers={target_layers!r} selects"
            )
        token_type = get("mod_target_token_type", "vision_all")
        if token_type not in TARGET_TOKEN_TYPES:
            raise PmodConfigError(
                f"unknown mod_target_token_type {token_type!r}: expected one of {', '.join(TARGET_TOKEN_TYPES)}"
            )
        return cls(
            num_layers=num_layers,
            retention_ratio=dict(ratios),
            weight_norm=WeightNorm.parse(get("mod_weight_norm", "tanh_0.2_1")),
            target_token_type=token_type,
            router_bias=bool(get("mod_bias_enabled", True)),
        )

    def is_pmod_layer(self, layer: int) -> bool:
        return layer in self.retention_ratio

    def kv_slots(self, num_prompt: int, num_targets: int, num_fed_after_prompt: int) -> list[int]:
        """Token slots each layer's KV cache holds (docs/p-mod.md, "KV cache of one request")."""
        slots = []
        for layer in range(self.num_layers):
            if layer in self.retention_ratio:
                kept = kept_target_count(num_targets, self.retention_ratio[layer])
                slots.append(num_prompt - num_targets + kept + num_fed_after_prompt)
            else:
                slots.append(num_prompt + num_fed_after_prompt)
        return slots
