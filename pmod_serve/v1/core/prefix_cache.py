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
        routing_tag = hashlib.sha256(repr(layout.targets.ranges).encode()).digest() if layout.routed else b""
        layer_tags = [layer.to_bytes(2, "big") for layer in range(layout.num_layers)]
        self._dense_tags = [b"pmod-dense" + tag for tag in layer_tags]
        self._routed_tags = [b"pmod-routed" + routing_tag + tag for tag in layer_tags]

    def names(
        self, layers: np.ndarray, starts: np.ndarray, stops: np.ndarray
    ) -> tuple[list[int], list[int], list[bytes], list[int]]:
        """Names of blocks `starts[i]` .. `stops[i] - 1` of each of `layers`, up to each layer's
        first block without a name yet: `(layer, index, name, covered tokens)` of every named
        block (as four lists, layer after layer); covered tokens are the original tokens the
        block depends on (vLLM's `block_hash_num_tokens`).

        A name is the token hash of the original block holding the dependency position, then a
        tag: the layer for a dense block; the routing, the layer and the index for a routed one.
        Token hashes have one length per engine and the two tags differ in length, so names are
        unique without hashing them again. One call covers all layers: a 7B image request names
        ~3,400 blocks at its prefill and 32 every 16 tokens of decoding."""
        layout = self.layout
        block_size = self.block_size
        counts = np.maximum(stops - starts, 0)
        layer = np.repeat(layers, counts)
        first_of_run = np.cumsum(counts) - counts
        index = np.arange(int(counts.sum())) - np.repeat(first_of_run - starts, counts)
        last_slot = (index + 1) * block_size - 1
        if layout.routed:
            skipped = layout.skipped[layer]
            routed = last_slot >= layout.span_start
            within = last_slot < layout.span_end - skipped
            dependency = np.where(~routed, last_slot, np.where(within, layout.span_end - 1, last_slot + skipped))
        else:
            routed = np.zeros(len(last_slot), dtype=bool)
            dependency = last_slot
        original_block = dependency // block_size
        # Dependency positions never decrease along a layer, so the named blocks of each layer
        # are a prefix of its range.
        named = original_block < len(self.block_hashes)
        layer, index, routed, original_block = layer[named], index[named], routed[named], original_block[named]
        hashes, dense_tags, routed_tags = self.block_hashes, self._dense_tags, self._routed_tags
        names = [
            hashes[block] + (routed_tags[at] + position.to_bytes(4, "big") if is_routed else dense_tags[at])
            for block, is_routed, at, position in zip(
                original_block.tolist(), routed.tolist(), layer.tolist(), index.tolist()
            )
        ]
        return layer.tolist(), index.tolist(), names, ((original_block + 1) * block_size).tolist()


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
    runs: list[list] = [[] for _ in range(layout.num_layers)]
    ended = np.zeros(layout.num_layers, dtype=bool)  # a layer whose run met a miss
    # All layers' next names in one call per round, in growing batches: most runs end within a
    # few blocks (a new image's span). A layer whose run ends lowers the hit to what the run
    # covers, and with it what every layer needs; the order of layers does not matter.
    batch = 4
    while hit > 0:
        held = np.array([len(run) for run in runs], dtype=np.int64)
        needed = layout.layer_blocks(hit)
        layers = np.flatnonzero(~ended & (held < needed))
        if not len(layers):
            break
        stops = np.minimum(needed[layers], held[layers] + batch)
        named_layers, _, names, _ = keys.names(layers, held[layers], stops)
        for layer, name in zip(named_layers, names):
            if ended[layer]:
                continue
            block = lookup(name)
            if block is None:
                ended[layer] = True
            else:
                runs[layer].append(block)
        for layer, stop in zip(layers.tolist(), stops.tolist()):
            if len(runs[layer]) < stop:  # a miss, or no name yet
                ended[layer] = True
                hit = min(hit, layout.max_tokens_within(layer, len(runs[layer]) * block_size))
        batch *= 4
    if hit <= 0:
        return [], 0
    counts = layout.layer_blocks(hit)
    return [block for run, count in zip(runs, counts) for block in run[:count]], hit
