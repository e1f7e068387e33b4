"""What the KV cache really holds, read from the scheduler's block tables.

Used by the metrics (pmod_serve.metrics) and by the tests that check them. A "layer-block" is
one block of one layer: in a p-MoD engine each KV cache group holds one or more layers, and a
block id of a group stands for a block in each of its layers.
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
    requests: dict[str, RequestKV] = field(default_factory=dict)

    @property
    def layer_blocks(self) -> int:
        return sum(r.layer_blocks for r in self.requests.values())

    @property
    def dense_layer_blocks(self) -> int:
        return sum(r.dense_layer_blocks for r in self.requests.values())

    @property
    def savings_ratio(self) -> float:
        dense = self.dense_layer_blocks
        return 1.0 - self.layer_blocks / dense if dense else 0.0


def request_kv(scheduler, request) -> RequestKV | None:
    """Blocks the KV managers hold for `request` now, against a dense layout of its tokens."""
    coordinator = scheduler.kv_cache_manager.coordinator
    groups = scheduler.kv_cache_config.kv_cache_groups
    request_id = request.request_id
    # Tokens with a slot in an ordinary layer: everything fed so far (spec §2: P + G).
    num_tokens = request.num_computed_tokens
    targets = getattr(scheduler, "request_targets", {}).get(request_id)
    num_layers = layer_blocks = dense_blocks = layer_slots = 0
    for manager, group in zip(coordinator.single_type_managers, groups):
        layers = len(group.layer_names)
        blocks = manager.req_to_blocks.get(request_id, ())
        num_layers += layers
        layer_blocks += sum(1 for block in blocks if not block.is_null) * layers
        dense_blocks += cdiv(num_tokens, manager.block_size) * layers
        ratio = getattr(group.kv_cache_spec, "retention_ratio", None)
        slots = targets.compacted_length(num_tokens, ratio) if targets is not None else num_tokens
        layer_slots += slots * layers
    if layer_blocks == 0:
        return None
    return RequestKV(layer_blocks, dense_blocks, layer_slots, num_tokens * num_layers)


def kv_usage(scheduler) -> KVUsage:
    usage = KVUsage()
    for request in scheduler.requests.values():
        kv = request_kv(scheduler, request)
        if kv is not None:
            usage.requests[request.request_id] = kv
    return usage
