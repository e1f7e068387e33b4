"""What the KV cache really holds, read from the scheduler's block tables.

Used by the metrics (pmod_serve.v1.metrics.prometheus) and by the tests that check them. A "layer-block" is
one block of one layer: the p-MoD pool lends single-layer blocks (pmod_serve.v1.core.kv_cache_manager), so a
request's block list holds its layer-blocks, all layers together.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.utils.math_utils import cdiv


@dataclass
class RequestKV:
    layer_blocks: int  # layer-blocks held, summed over layers
    dense_layer_blocks: int  # what a dense LLaVA layout would hold for the same tokens
    layer_slots: int  # token slots written, summed over layers
    dense_layer_slots: int

    @property
    def savings_ratio(self) -> float:
        return 1.0 - self.layer_blocks / self.dense_layer_blocks if self.dense_layer_blocks else 0.0


@dataclass
class KVUsage:
    """What the running requests hold together. With prefix caching, requests share blocks:
    `layer_blocks` counts each pool block once (exactly the pool's blocks in use by requests),
    and `dense_layer_blocks` counts a dense layout with every full token block of identical
    content (same prefix hash) once: what dense vLLM's prefix caching could hold at best."""

    requests: dict[str, RequestKV] = field(default_factory=dict)
    layer_blocks: int = 0
    dense_layer_blocks: int = 0

    @property
    def savings_ratio(self) -> float:
        dense = self.dense_layer_blocks
        return 1.0 - self.layer_blocks / dense if dense else 0.0


def request_kv(scheduler, request) -> RequestKV | None:
    """Blocks the KV manager holds for `request` now (shared ones included), against a dense
    layout of its tokens."""
    manager = scheduler.pmod_kv_manager
    request_id = request.request_id
    # Full attention holds no null blocks: every entry is a real block.
    held = len(manager.req_to_blocks.get(request_id, ()))
    if held == 0:
        return None
    layout = manager.layouts.get(request_id)
    num_layers = len(manager.layer_ratios)
    # Tokens with a slot in an ordinary layer: everything fed so far (docs/p-mod.md, "KV cache of one request": P + G).
    num_tokens = request.num_computed_tokens
    slots = layout.total_slots(num_tokens) if layout is not None else num_tokens * num_layers
    dense_blocks = cdiv(num_tokens, manager.block_size) * num_layers
    return RequestKV(held, dense_blocks, slots, num_tokens * num_layers)


def kv_usage(scheduler, per_request: bool = False) -> KVUsage:
    """The running requests' blocks and their dense equivalent; with `per_request`, each
    request's `RequestKV` too (a pass over every request's layout, for tests and reports).

    Runs on the engine's scheduling path every few steps, so it costs O(requests), never
    O(blocks): a 7B image request holds ~3,400 layer-blocks."""
    manager = scheduler.pmod_kv_manager
    block_size = manager.block_size
    pool = manager.block_pool
    usage = KVUsage()
    dense_full: set[bytes] = set()  # token-block hashes of the requests' full dense blocks
    dense_other = 0  # dense blocks not shareable by content: partial, or unhashed (no caching)
    for request in scheduler.requests.values():
        if not manager.req_to_blocks.get(request.request_id):
            continue
        if per_request:
            usage.requests[request.request_id] = request_kv(scheduler, request)
        num_tokens = request.num_computed_tokens
        hashes = request.block_hashes[: num_tokens // block_size] if manager.enable_caching else ()
        dense_full.update(hashes)
        dense_other += cdiv(num_tokens, block_size) - len(hashes)
    # Blocks held by requests are exactly the pool's blocks off its free queue (block 0 is the
    # null block): each shared block counted once, without walking the requests' block lists.
    usage.layer_blocks = pool.num_gpu_blocks - 1 - pool.get_num_free_blocks()
    usage.dense_layer_blocks = (len(dense_full) + dense_other) * len(manager.layer_ratios)
    return usage
