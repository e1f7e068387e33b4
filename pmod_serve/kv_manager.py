"""Per-layer KV allocation that follows progressive ratio decay, as ONE KV cache group.

vLLM's own way to give layers different block tables is one KV cache group per kind of layer.
For p-MoD that means one group per retention ratio (18-32 groups for the releases), and vLLM's
scheduler and model runner repeat their per-group Python work for every one of them on every
step (vLLM issues #49472, #51742). Instead, the whole decoder is one group here:

- `PmodAttentionSpec` describes the stack: every attention layer's name and retention ratio
  (`None` for ordinary layers). The model runner reports it under one layer name, so vLLM sizes
  the pool in single-layer pages (one block = one layer's page) and sees a single group;
  `max_memory_usage_bytes` counts every layer, so start-up checks and concurrency stay right.
- `PmodAttentionManager` lends a request, from that one pool, the blocks of all its layers
  together: `RequestKVLayout.total_blocks` (each layer `ceil(slots / block_size)`, a skipped
  visual token never takes a slot). The model runner splits the request's block list back into
  per-layer block tables (`pmod_serve.block_table`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from vllm.utils.math_utils import cdiv
from vllm.v1.core.kv_cache_utils import KVCacheBlock
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from pmod_serve.kv_layout import RequestKVLayout, RequestTargets


@dataclass(frozen=True, kw_only=True)
class PmodAttentionSpec(FullAttentionSpec):
    """Full attention for a stack of layers sharing one block pool, each layer compacted by its
    retention ratio. `page_size_bytes` is one layer's page."""

    layer_names: tuple[str, ...] = ()
    retention_ratios: tuple[float | None, ...] = ()

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    @classmethod
    def merge(cls, specs: list[PmodAttentionSpec]) -> PmodAttentionSpec:
        assert all(spec == specs[0] for spec in specs), "one KV cache group holds one p-MoD stack"
        return replace(super().merge(specs), layer_names=specs[0].layer_names,
                       retention_ratios=specs[0].retention_ratios)

    def max_memory_usage_bytes(self, vllm_config) -> int:
        # A request without images keeps every token in every layer.
        return self.num_layers * super().max_memory_usage_bytes(vllm_config)

    def max_num_blocks_per_req(self, vllm_config, max_model_len: int) -> int:
        # Per layer: the model runner keeps one block table row per layer.
        return cdiv(max_model_len, self.block_size)


class PmodAttentionManager(FullAttentionManager):
    """Lends each request the blocks of all its layers from the one pool.

    vLLM's full-attention bookkeeping runs unchanged on a *virtual* token count: the request's
    total blocks times the block size. The scheduler registers each request's targets
    (`add_request_targets`) before the first allocation.
    """

    def __init__(self, kv_cache_spec: PmodAttentionSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.layer_ratios = kv_cache_spec.retention_ratios
        # The base class only records new blocks for the built-in spec types.
        self._record_new_block_ids = bool(kwargs.get("needs_kv_cache_zeroing", False))
        self.layouts: dict[str, RequestKVLayout] = {}

    def add_request_targets(self, request_id: str, targets: RequestTargets) -> RequestKVLayout:
        layout = self.layouts.get(request_id)
        if layout is None:
            layout = self.layouts[request_id] = RequestKVLayout(targets, self.layer_ratios, self.block_size)
        return layout

    def drop_request(self, request_id: str) -> None:
        self.layouts.pop(request_id, None)

    def _virtual_tokens(self, request_id: str, num_tokens: int) -> int:
        layout = self.layouts.get(request_id)
        if layout is None:
            raise RuntimeError(
                "PmodAttentionManager needs the p-MoD scheduler (pmod_serve.scheduler) to register "
                f"request {request_id}; was scheduler_cls overridden?"
            )
        return layout.total_blocks(num_tokens) * self.block_size

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
        virtual = self._virtual_tokens(request_id, num_tokens)
        return super().get_num_blocks_to_allocate(
            request_id,
            virtual,
            new_computed_blocks,
            total_computed_tokens,
            num_local_computed_tokens,
            virtual if num_tokens_main_model == num_tokens else self._virtual_tokens(request_id, num_tokens_main_model),
            apply_admission_cap,
        )

    def allocate_new_blocks(
        self, request_id: str, num_tokens: int, num_tokens_main_model: int
    ) -> list[KVCacheBlock]:
        virtual = self._virtual_tokens(request_id, num_tokens)
        return super().allocate_new_blocks(
            request_id,
            virtual,
            virtual if num_tokens_main_model == num_tokens else self._virtual_tokens(request_id, num_tokens_main_model),
        )


def register_kv_cache_spec() -> None:
    """Register the spec and its manager (idempotent; needed in scheduler and worker processes)."""
    # The registry fills in vLLM's built-in specs only while it is empty, so make sure they are
    # there before adding ours.
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(
        PmodAttentionSpec, PmodAttentionManager, uniform_type_base_spec=PmodAttentionSpec
    )
