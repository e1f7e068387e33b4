"""Which prompt tokens a p-MoD layer may skip, and how many KV slots that leaves.

This arithmetic is shared by the scheduler side (block allocation) and the worker side
(compacted attention metadata and slot mappings), so both agree on every layer's compacted
token count. The counts depend only on the request (its visual spans) and the layer's
retention ratio; *which* visual tokens are kept is decided inside the forward pass and does
not change any count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pmod_serve.pmod.targets import RequestTargets


def span_split_error(num_tokens: int, start: int, end: int) -> ValueError:
    return ValueError(
        f"p-MoD: {num_tokens} tokens end inside the visual span [{start}, {end}); "
        "a request's visual tokens must be prefilled in one step"
    )


def compacted_counts(
    num_tokens: Any, skipped: Any, span_start: Any, span_end: Any, skips: Any = True
) -> np.ndarray:
    """KV slots a layer holds once `num_tokens` tokens have been fed (docs/p-mod.md, "KV cache of
    one request"): every token up to the visual span, `num_tokens - skipped` from its end on; a
    count inside the span is an error (`span_split_error`), unless nothing is skipped (`skips`).

    Broadcasts, so that the KV managers (one request, `skipped[layer]`) and the model runner (a
    step, `skipped[class, request]` with `[request]` counts and spans) share this one rule."""
    num_tokens = np.asarray(num_tokens)
    inside = np.asarray(skips) & (num_tokens > span_start) & (num_tokens < span_end)
    if inside.any():
        tokens, start, end, inside = np.broadcast_arrays(num_tokens, span_start, span_end, inside)
        i = int(np.argmax(inside.ravel()))
        raise span_split_error(int(tokens.ravel()[i]), int(start.ravel()[i]), int(end.ravel()[i]))
    return np.where(num_tokens >= span_end, num_tokens - skipped, num_tokens)


class RequestKVLayout:
    """How many KV slots and blocks each attention layer holds for one request.

    All layers of a p-MoD model draw on one block pool, and a request's blocks form one list in
    allocation order: every allocation tops each layer up to the blocks it needs, layer after
    layer. The scheduler's KV manager only needs the total (`total_blocks`); the model runner
    splits a list of new blocks back into layers with `split_new_blocks`. Both follow from the
    token count alone, so the two processes agree without exchanging anything.

    `skipped[l]` is the number of target tokens layer `l` never caches (0 for ordinary layers).
    """

    def __init__(self, targets: RequestTargets, layer_ratios: Sequence[float | None], block_size: int) -> None:
        self.targets = targets
        self.block_size = block_size
        self.span_start, self.span_end = targets.span
        self.skipped = np.array([targets.num_skipped(ratio) for ratio in layer_ratios], dtype=np.int64)
        self.skips = bool(self.skipped.any())
        # Whether any layer routes this request's tokens (re-weights them, even if it keeps all).
        self.routed = bool(targets.ranges)
        self.total_skipped = int(self.skipped.sum())
        self.num_layers = len(self.skipped)
        # Layers whose slot count crosses into a new block when one token is added past the span:
        # layer l's count n - skipped[l] starts a block whenever (n - 1 - skipped[l]) % block_size == 0.
        residues = self.skipped % block_size
        self._crossing = [np.flatnonzero(residues == r) for r in range(block_size)]
        self._crossing_count = [len(layers) for layers in self._crossing]
        self._total_at: tuple[int, int] = (0, 0)  # (num_tokens, total_blocks) of the last query

    def layer_slots(self, num_tokens: int) -> np.ndarray:
        """KV slots of every layer once the first `num_tokens` tokens have been fed."""
        if not self.skips or num_tokens <= self.span_start:
            return np.full(self.num_layers, num_tokens, dtype=np.int64)
        return compacted_counts(num_tokens, self.skipped, self.span_start, self.span_end)

    def total_slots(self, num_tokens: int) -> int:
        """KV slots of all layers together (O(1) outside the visual span)."""
        if not self.skips or num_tokens <= self.span_start:
            return num_tokens * self.num_layers
        if num_tokens < self.span_end:
            raise span_split_error(num_tokens, self.span_start, self.span_end)
        return num_tokens * self.num_layers - self.total_skipped

    def layer_blocks(self, num_tokens: int) -> np.ndarray:
        return -(-self.layer_slots(num_tokens) // self.block_size)

    def total_blocks(self, num_tokens: int) -> int:
        """Blocks of all layers together for `num_tokens` fed tokens (what the pool lends)."""
        last_tokens, last_total = self._total_at
        if num_tokens == last_tokens:
            return last_total
        if num_tokens == last_tokens + 1 and self._one_token_step(last_tokens):
            # One more token (decoding): only the layers whose count starts a block grow.
            total = last_total + self._crossing_count[last_tokens % self.block_size]
        elif num_tokens == last_tokens - 1 and self._one_token_step(num_tokens):
            # One token less (what a decoding step held before): the same step backwards, not
            # remembered, so that the next step's query is again one token forward.
            return last_total - self._crossing_count[num_tokens % self.block_size]
        else:
            total = int(self.layer_blocks(num_tokens).sum())
        self._total_at = (num_tokens, total)
        return total

    def split_new_blocks(self, held: np.ndarray, num_new: int) -> np.ndarray:
        """How many of `num_new` newly allocated blocks go to each layer, given the blocks each
        layer already `held` (the result of earlier allocations, which always top every layer up
        to the same token count). Totals determine the split: `layer_blocks` is non-decreasing in
        the token count, so two token counts with the same total have the same per-layer counts."""
        target = int(held.sum()) + num_new

        def total(num_tokens: int) -> int:
            return int(self.layer_blocks(num_tokens).sum())

        if self.skips and total(self.span_start) >= target:
            low, high = 0, self.span_start
        else:
            low = self.span_end if self.skips else 0
            high = max(low, 1)
            while total(high) < target:
                low, high = high + 1, high * 2
        while low < high:  # the smallest token count whose blocks reach the target
            mid = (low + high) // 2
            if total(mid) >= target:
                high = mid
            else:
                low = mid + 1
        blocks = self.layer_blocks(high)
        if int(blocks.sum()) != target or (blocks < held).any():
            raise RuntimeError(f"p-MoD: {num_new} new KV blocks fit no token count (held {held.tolist()})")
        return blocks - held

    def new_blocks_per_layer(self, held: np.ndarray, num_tokens: int, num_new: int) -> np.ndarray:
        """How many of `num_new` blocks lent at once to top every layer up to `num_tokens` fed
        tokens go to each layer, given the blocks each layer `held`. They come layer after layer:
        the order in which the scheduler's KV manager and the model runner's block table both
        read a block list."""
        new = self.layer_blocks(num_tokens) - held if _valid_count(self, num_tokens) else None
        if new is None or int(new.sum()) != num_new or (new < 0).any():
            new = self.split_new_blocks(held, num_new)
        return new

    def max_tokens_within(self, layer: int, num_slots: int) -> int:
        """The largest token count a request may resume from (`RequestTargets.resumable`) at which
        `layer` holds at most `num_slots` KV slots."""
        skipped = int(self.skipped[layer])
        if self.skips and num_slots >= self.span_start:
            # Past the span the layer holds num_tokens - skipped slots; a layer that cannot hold
            # the whole span resumes before it.
            num_tokens = num_slots + skipped if num_slots + skipped >= self.span_end else self.span_start
        else:
            num_tokens = num_slots
        return self.targets.resumable(num_tokens)

    def _one_token_step(self, num_tokens: int) -> bool:
        """Whether growing from `num_tokens` to `num_tokens + 1` tokens adds a block to exactly
        the layers of `_crossing[num_tokens % block_size]` (past the span, or no span)."""
        return num_tokens > 0 and (num_tokens >= self.span_end or not self.skips)

    def decode_layers(self, held_blocks: int, num_tokens: int, num_new: int) -> np.ndarray | None:
        """The layers of `num_new` blocks lent to a request holding `held_blocks` blocks so that
        it grows to `num_tokens` tokens, when that is one more token than the blocks held serve
        (decoding): one block for each layer whose count crosses a block boundary. None for any
        other allocation (`new_blocks_per_layer` then)."""
        if not self._one_token_step(num_tokens - 1):
            return None
        crossing = self._crossing[(num_tokens - 1) % self.block_size]
        if len(crossing) != num_new or held_blocks != self.total_blocks(num_tokens - 1):
            return None
        return crossing


def _valid_count(layout: RequestKVLayout, num_tokens: int) -> bool:
    return not layout.skips or not (layout.span_start < num_tokens < layout.span_end)
