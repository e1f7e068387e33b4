"""Per-layer KV allocation that follows progressive ratio decay.

Every attention layer of a p-MoD model gets a `PmodAttentionSpec` carrying its retention ratio
(`None` for ordinary layers). Layers with different ratios are different specs, so vLLM's
hybrid KV-cache grouping puts them in different KV cache groups, each with its own block table,
all drawing on one block pool. `PmodAttentionManager` sizes a group's blocks from the request's
*compacted* length: a visual token the layer skips never gets a slot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from vllm.v1.core.kv_cache_utils import KVCacheBlock
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from pmod_serve.kv_layout import RequestTargets


@dataclass(frozen=True, kw_only=True)
class PmodAttentionSpec(FullAttentionSpec):
    """Full attention whose cached length is compacted by the layer's retention ratio."""

    retention_ratio: float | None = None

    @classmethod
    def merge(cls, specs: list[PmodAttentionSpec]) -> PmodAttentionSpec:
        ratios = {spec.retention_ratio for spec in specs}
        assert len(ratios) == 1, f"one KV cache group mixes retention ratios {ratios}"
        return replace(super().merge(specs), retention_ratio=ratios.pop())

    def is_uniform_with_collection(self, kv_cache_specs: dict[str, KVCacheSpec]) -> bool:
        # Layers of different ratios need different block tables: never one uniform group.
        return all(
            isinstance(spec, PmodAttentionSpec) and spec.retention_ratio == self.retention_ratio
            for spec in kv_cache_specs.values()
        )


class PmodAttentionManager(FullAttentionManager):
    """Allocates a KV cache group's blocks for the request's compacted length in that group.

    The scheduler hands every manager the same `request_targets` dict (request id ->
    `RequestTargets`) and keeps it current; managers only read it.
    """

    def __init__(self, kv_cache_spec: PmodAttentionSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.retention_ratio = kv_cache_spec.retention_ratio
        # The base class only records new blocks for the built-in spec types.
        self._record_new_block_ids = bool(kwargs.get("needs_kv_cache_zeroing", False))
        self.request_targets: dict[str, RequestTargets] | None = None

    def compacted_length(self, request_id: str, num_tokens: int) -> int:
        if self.retention_ratio is None:
            return num_tokens
        if self.request_targets is None:
            raise RuntimeError(
                "PmodAttentionManager needs the p-MoD scheduler (pmod_serve.scheduler); "
                "was scheduler_cls overridden?"
            )
        targets = self.request_targets.get(request_id)
        if targets is None:
            return num_tokens
        return targets.compacted_length(num_tokens, self.retention_ratio)

    def get_num_blocks_to_allocate(
        self,
        request_id: str,
        num_tokens: int,
        new_computed_blocks: Sequence[KVCacheBlock],
        total_computed_tokens: int,
        num_local_computed_tokens: int,
        num_tokens_main_model: int,
        apply_admission_cap: bool = False,
    ) -> int:
        # Prefix caching is off for p-MoD models, so the computed-token counts are 0 here.
        return super().get_num_blocks_to_allocate(
            request_id,
            self.compacted_length(request_id, num_tokens),
            new_computed_blocks,
            total_computed_tokens,
            num_local_computed_tokens,
            self.compacted_length(request_id, num_tokens_main_model),
            apply_admission_cap,
        )

    def allocate_new_blocks(
        self, request_id: str, num_tokens: int, num_tokens_main_model: int
    ) -> list[KVCacheBlock]:
        return super().allocate_new_blocks(
            request_id,
            self.compacted_length(request_id, num_tokens),
            self.compacted_length(request_id, num_tokens_main_model),
        )


def register_kv_cache_spec() -> None:
    """Register the spec and its manager (idempotent; needed in scheduler and worker processes)."""
    # The registry fills in vLLM's built-in specs only while it is empty, so make sure they are
    # there before adding ours.
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(
        PmodAttentionSpec, PmodAttentionManager, uniform_type_base_spec=PmodAttentionSpec
    )
