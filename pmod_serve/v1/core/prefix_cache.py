"""Exact prefix caching of compacted p-MoD KV blocks (issue #17).

vLLM's automatic prefix caching names a block by the tokens up to its end (a chained hash of
full token blocks, `Request.block_hashes`, with the images' content hashes mixed in). p-MoD
blocks are per layer and compacted: block `j` of layer `l` holds the layer's kept tokens number
`j*B ... j*B + B-1` (B = block size), and the visual tokens a layer keeps depend on the whole
visual span (top-k over all of a request's targets). What a block holds is still a deterministic
function of a few things, which name it here (`LayerBlockKeys`):

- a block whose slots all lie before the first target token holds dense KV of the tokens up to
  its last slot: it is named by the layer and the token hash of the same block, exactly as a
  text-only request names it (so such blocks are shared with text-only requests too);
- any other block depends on the routing: named by the layer, its index `j`, the request's
  target ranges, and the token hash of the original block holding its *dependency position*:
  the original position of its last slot (`slot + skipped` past the span), or the span's last
  token for a slot inside the span, whichever is later. The chained hash covers every token up to
  there, images included; the target ranges fix what top-k ran over.

A hit of `N` original tokens gives layer `l` `N - skipped_l` slots (`N` before the span), not a
block multiple for every layer at once. So a hit is the largest `N` (never inside the visual span
or an image: `RequestTargets.resumable`) for which every layer finds cached blocks covering its
slots; layer `l` then shares `ceil(slots_l(N) / B)` blocks, all full. The request resumes at
`N` and recomputes the rest; a layer whose last shared block already holds slots past
`slots_l(N)` gets no KV written there (slot -1: vLLM's cache-write kernels skip negative slots),
because what the request computes for those slots is what the block holds (same name, same
content), and another request may be reading it. The tokens recomputed after a hit that covers
the span are text: every layer processes them in full (no routing), and their attention reads the
layers' cached kept tokens, as in a cold run. A hit before the span recomputes the whole span.

Blocks are shared through vLLM's block pool (reference counts, LRU eviction of free cached
blocks); a request's block list stays "layer after layer per allocation", the order the model
runner splits it in, with the hit's blocks as the first allocation (at `N` tokens).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np

from pmod_serve.pmod.kv_layout import RequestKVLayout


class LayerBlockKeys:
    """Content names of one request's compacted layer blocks (see the module docstring)."""

    def __init__(self, layout: RequestKVLayout, block_hashes: Sequence[bytes]) -> None:
        self.layout = layout
        self.block_hashes = block_hashes
        self.block_size = layout.block_size
        self.routing_tag = (
            hashlib.sha256(repr(layout.targets.ranges).encode()).digest() if layout.routed else b""
        )

    def dependency(self, layer: int, slot: int) -> int:
        """The last original position the KV of `layer`'s compacted `slot` depends on."""
        layout = self.layout
        if not layout.routed or slot < layout.span_start:
            return slot
        skipped = int(layout.skipped[layer])
        return layout.span_end - 1 if slot < layout.span_end - skipped else slot + skipped

    def key(self, layer: int, index: int) -> bytes | None:
        """The name of `layer`'s block `index`, or None while the tokens it depends on do not
        fill an original block yet (its token hash does not exist)."""
        last_slot = (index + 1) * self.block_size - 1
        dependency = self.dependency(layer, last_slot)
        original_block = dependency // self.block_size
        if original_block >= len(self.block_hashes):
            return None
        if not self.layout.routed or last_slot < self.layout.span_start:
            tag = b"pmod-dense" + layer.to_bytes(2, "big")
        else:
            tag = b"pmod-routed" + self.routing_tag + layer.to_bytes(2, "big") + index.to_bytes(4, "big")
        return hashlib.sha256(self.block_hashes[original_block] + tag).digest()

    def covered_tokens(self, layer: int, index: int) -> int:
        """Original tokens block `index` of `layer` depends on (for vLLM's `block_hash_num_tokens`)."""
        return (self.dependency(layer, (index + 1) * self.block_size - 1) // self.block_size + 1) * self.block_size


def find_prefix_hit(
    layout: RequestKVLayout,
    keys: LayerBlockKeys,
    max_tokens: int,
    lookup: Callable[[bytes], object | None],
) -> tuple[list, int]:
    """The longest exact hit of at most `max_tokens` tokens: the request's computed blocks
    (layer after layer, `layout.layer_blocks(hit)` each) and the hit length in tokens."""
    block_size = layout.block_size
    hit = layout.targets.resumable(max_tokens)
    slots = layout.layer_slots(hit)
    runs: list[list] = []
    for layer in range(layout.num_layers):
        needed = -(-int(slots[layer]) // block_size)
        run = []
        for index in range(needed):
            key = keys.key(layer, index)
            block = lookup(key) if key is not None else None
            if block is None:
                break
            run.append(block)
        if len(run) < needed:
            # This layer's cached run is shorter: resume where it still covers every slot.
            hit = min(hit, layout.max_tokens_within(layer, len(run) * block_size))
            if hit <= 0:
                return [], 0
            slots = layout.layer_slots(hit)
        runs.append(run)
    counts = layout.layer_blocks(hit)
    return [block for run, count in zip(runs, counts) for block in run[:count]], hit


def layer_block_lists(layout: RequestKVLayout, blocks: Sequence, held_per_layer: list[list], num_tokens: int) -> None:
    """Append a list of blocks lent at once (to reach `num_tokens` tokens) to each layer's list."""
    held = np.array([len(layer_blocks) for layer_blocks in held_per_layer], dtype=np.int64)
    for layer, block in zip(layout.layer_of_new_blocks(held, num_tokens, len(blocks)).tolist(), blocks):
        held_per_layer[layer].append(block)
