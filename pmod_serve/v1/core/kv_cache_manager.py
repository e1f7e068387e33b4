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
  per-layer block tables (`pmod_serve.v1.worker.block_table`).

Prefix caching (`pmod_serve.v1.core.prefix_cache`): the manager names each full layer block by its
content, finds a request's exact hit, and lends the hit's shared blocks as the request's first
allocation. `PmodKVCacheManager` routes vLLM's hit lookup here, since that lookup needs the
request (its visual span), which vLLM's per-group lookup does not get.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from vllm.utils.math_utils import cdiv
from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
from vllm.v1.core.kv_cache_utils import KVCacheBlock, make_block_hash_with_group_id
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from pmod_serve.pmod.kv_layout import RequestKVLayout, RequestTargets
from pmod_serve.v1.core.prefix_cache import LayerBlockKeys, find_prefix_hit


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


@dataclass
class RequestLayerBlocks:
    """One request's blocks per layer and how many of each layer's are in the prefix cache
    (prefix caching only)."""

    layers: list[list[KVCacheBlock]]
    cached: np.ndarray  # [layer] blocks named in the prefix cache
    num_blocks: int = 0  # all layers' blocks together
    cached_up_to: int = 0  # token count the names were last brought up to
    keys: LayerBlockKeys | None = field(default=None, repr=False)

    @classmethod
    def empty(cls, num_layers: int) -> RequestLayerBlocks:
        return cls([[] for _ in range(num_layers)], np.zeros(num_layers, dtype=np.int64))

    def add(self, layout: RequestKVLayout, blocks: Sequence[KVCacheBlock], num_tokens: int) -> None:
        """File a list of blocks lent at once (to reach `num_tokens` tokens) under their layers,
        as the model runner's block table does (`PmodBlockTable._assign`)."""
        decode = layout.decode_layers(self.num_blocks, num_tokens, len(blocks))
        self.num_blocks += len(blocks)
        if decode is not None:
            # Decoding: one block for each layer that crosses a block boundary (most steps of a
            # request lend one or two, the layers' counts being offset by their skipped tokens).
            for layer, block in zip(decode.tolist(), blocks):
                self.layers[layer].append(block)
            return
        held = np.array([len(layer_blocks) for layer_blocks in self.layers], dtype=np.int64)
        new = layout.new_blocks_per_layer(held, num_tokens, len(blocks))
        end = 0
        for layer_blocks, count in zip(self.layers, new.tolist()):
            layer_blocks.extend(blocks[end : end + count])
            end += count


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
        # Prefix caching: every live request's blocks per layer, and its last hit (tokens).
        self.layer_blocks_of: dict[str, RequestLayerBlocks] = {}
        self.prefix_hits: dict[str, int] = {}

    def add_request_targets(self, request_id: str, targets: RequestTargets) -> RequestKVLayout:
        layout = self.layouts.get(request_id)
        if layout is None:
            layout = self.layouts[request_id] = RequestKVLayout(targets, self.layer_ratios, self.block_size)
        return layout

    def drop_request(self, request_id: str) -> None:
        self.layouts.pop(request_id, None)
        self.prefix_hits.pop(request_id, None)

    def _layout(self, request_id: str) -> RequestKVLayout:
        layout = self.layouts.get(request_id)
        if layout is None:
            raise RuntimeError(
                "PmodAttentionManager needs the p-MoD scheduler (pmod_serve.v1.core.sched.scheduler) to register "
                f"request {request_id}; was scheduler_cls overridden?"
            )
        return layout

    def _virtual_tokens(self, request_id: str, num_tokens: int) -> int:
        return self._layout(request_id).total_blocks(num_tokens) * self.block_size

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
        virtual = self._virtual_tokens(request_id, num_tokens)
        # The computed-token counts only matter with a prefix-cache hit: its blocks are whole
        # blocks in virtual tokens (never vLLM's partial hit).
        computed = self._virtual_tokens(request_id, num_local_computed_tokens) if new_computed_blocks else 0
        return super().get_num_blocks_to_allocate(
            request_id,
            virtual,
            new_computed_blocks,
            computed,
            computed,
            virtual if num_tokens_main_model == num_tokens else self._virtual_tokens(request_id, num_tokens_main_model),
            apply_admission_cap,
        )

    def allocate_new_blocks(
        self, request_id: str, num_tokens: int, num_tokens_main_model: int
    ) -> list[KVCacheBlock]:
        virtual = self._virtual_tokens(request_id, num_tokens)
        new_blocks = super().allocate_new_blocks(
            request_id,
            virtual,
            virtual if num_tokens_main_model == num_tokens else self._virtual_tokens(request_id, num_tokens_main_model),
        )
        if self.enable_caching and new_blocks:
            layout = self.layouts[request_id]
            state = self.layer_blocks_of.get(request_id)
            if state is None:
                state = self.layer_blocks_of[request_id] = RequestLayerBlocks.empty(layout.num_layers)
            state.add(layout, new_blocks, num_tokens)
        return new_blocks

    # --- prefix caching ----------------------------------------------------------------------

    def find_prefix_hit(self, request, max_tokens: int) -> tuple[list[KVCacheBlock], int]:
        """The request's longest exact hit: its shared blocks (layer after layer) and length."""
        layout = self._layout(request.request_id)
        keys = LayerBlockKeys(layout, request.block_hashes)
        group_ids = [self.kv_cache_group_id]

        def lookup(key: bytes) -> KVCacheBlock | None:
            cached = self.block_pool.get_cached_block(key, group_ids)
            return cached[0] if cached else None

        return find_prefix_hit(layout, keys, max_tokens, lookup)

    def add_local_computed_blocks(
        self,
        request_id: str,
        new_computed_blocks: Sequence[KVCacheBlock],
        num_local_computed_tokens: int,
        num_external_computed_tokens: int,
    ) -> None:
        layout = self._layout(request_id)
        super().add_local_computed_blocks(
            request_id,
            new_computed_blocks,
            layout.total_blocks(num_local_computed_tokens) * self.block_size,
            num_external_computed_tokens,
        )
        if not self.enable_caching:
            return
        self.prefix_hits[request_id] = num_local_computed_tokens
        # The hit's blocks: the first allocation, at the hit's token count; all already named.
        state = RequestLayerBlocks.empty(layout.num_layers)
        state.add(layout, new_computed_blocks, num_local_computed_tokens)
        state.cached = np.array([len(blocks) for blocks in state.layers], dtype=np.int64)
        state.cached_up_to = num_local_computed_tokens
        self.layer_blocks_of[request_id] = state

    def cache_blocks(self, request, num_tokens: int, retention_interval: int | None = None) -> None:
        """Name the request's full layer blocks whose content is settled by its first
        `num_tokens` tokens (computed by the end of this step), as vLLM does for its blocks."""
        request_id = request.request_id
        state = self.layer_blocks_of.get(request_id)
        # vLLM's marker of a running request (its allocation fast path relies on it).
        self.num_cached_block.setdefault(request_id, 0)
        if state is None:
            return
        layout = self.layouts[request_id]
        # A block is named once the original block of its dependency position is hashed.
        up_to = layout.targets.resumable(min(num_tokens, len(request.block_hashes) * self.block_size))
        if up_to <= state.cached_up_to:
            return
        state.cached_up_to = up_to
        full = layout.layer_slots(up_to) // self.block_size
        layers = np.flatnonzero(full > state.cached)
        if not len(layers):
            return
        if state.keys is None or state.keys.block_hashes is not request.block_hashes:
            state.keys = LayerBlockKeys(layout, request.block_hashes)
        first = state.cached[layers]
        held = np.array([len(state.layers[layer]) for layer in layers.tolist()], dtype=np.int64)
        named_layers, indexes, names, covered = state.keys.names(layers, first, np.minimum(full[layers], held))
        insert = self.block_pool._insert_block_hash
        group_id = self.kv_cache_group_id
        for layer, index, name, num_tokens in zip(named_layers, indexes, names, covered):
            insert(make_block_hash_with_group_id(name, group_id), state.layers[layer][index], num_tokens=num_tokens)
        state.cached += np.bincount(named_layers, minlength=layout.num_layers)
        self.num_cached_block[request_id] = int(state.cached.sum())

    def pop_blocks_for_free(self, request_id: str) -> list[KVCacheBlock]:
        self.layer_blocks_of.pop(request_id, None)
        return super().pop_blocks_for_free(request_id)

    def get_num_common_prefix_blocks(self, running_request_id: str) -> int:
        # A request's block list mixes layers: no block is a common prefix of every layer's
        # table (and the p-MoD runner builds no cascade attention).
        return 0


class PmodKVCacheManager(KVCacheManager):
    """vLLM's KV cache manager, with the prefix-cache lookup done per request by the p-MoD
    manager (`PmodAttentionManager.find_prefix_hit`). The p-MoD scheduler swaps the class of
    the manager vLLM's scheduler built."""

    pmod_manager: PmodAttentionManager

    def get_computed_blocks(self, request) -> tuple[KVCacheBlocks, int, int]:
        if not self.enable_caching or request.skip_reading_prefix_cache:
            return self.empty_kv_cache_blocks, 0, 0
        # As vLLM: the last token is always recomputed, for its logits.
        blocks, num_hit_tokens = self.pmod_manager.find_prefix_hit(request, request.num_tokens - 1)
        if self.log_stats:
            assert self.prefix_cache_stats is not None
            self.prefix_cache_stats.record(
                num_tokens=request.num_tokens,
                num_hits=num_hit_tokens,
                preempted=request.num_preemptions > 0,
            )
        return self.create_kv_cache_blocks((blocks,)), num_hit_tokens, 0


def register_kv_cache_spec() -> None:
    """Register the spec and its manager (idempotent; needed in scheduler and worker processes)."""
    # The registry fills in vLLM's built-in specs only while it is empty, so make sure they are
    # there before adding ours.
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(
        PmodAttentionSpec, PmodAttentionManager, uniform_type_base_spec=PmodAttentionSpec
    )
