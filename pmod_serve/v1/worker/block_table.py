"""The model runner's per-layer block tables of a p-MoD stack, behind vLLM's `BlockTable` API.

The scheduler lends each request one list of single-layer blocks for all its layers
(`pmod_serve.v1.core.kv_cache_manager`). vLLM's input batch hands the runner that list, row by row, through
the `BlockTable` interface (`add_row`, `append_row`, `move_row`, `swap_row`, `clear_row`,
`commit_block_table`); this class keeps, instead of one row per request, one row per request
*and layer* in a stacked `[layer, request, block]` table, so every layer's attention reads its
own blocks and the whole table is copied to the device in one transfer.

Which layer a new block belongs to follows from token counts alone (`RequestKVLayout`): new
blocks are queued per row and assigned once the step's token count is known
(`assign_pending`): one more token past the visual span adds one block to exactly the layers
whose slot count crosses a block boundary; anything else tops every layer up to the step's
token count, layer after layer. A request that resumes from a prefix-cache hit of `N` tokens
comes with the hit's shared blocks first: they top every layer up to `N` tokens, and the slots
they already hold past each layer's count at `N` are never written again (`written`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from vllm.v1.utils import CpuGpuBuffer
from vllm.v1.worker.block_table import BlockTable

from pmod_serve.pmod.kv_layout import RequestKVLayout


class PmodBlockTable(BlockTable):
    def __init__(
        self,
        *,
        num_layers: int,
        num_classes: int,
        block_size: int,
        max_num_reqs: int,
        max_blocks_per_layer: int,
        max_num_batched_tokens: int,
        pin_memory: bool,
        device: torch.device,
        layout_of_row: Callable[[int], RequestKVLayout],
        class_of_layer: np.ndarray,
    ) -> None:
        # vLLM's BlockTable.__init__ allocates 2-D per-group buffers; none of them are used.
        self.max_num_reqs = max_num_reqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.pin_memory = pin_memory
        self.device = device
        self.block_size = self.kv_cache_block_size = block_size
        self.blocks_per_kv_block = 1
        self.use_hybrid_blocks = False
        self.max_num_blocks_per_req = max_blocks_per_layer
        self.num_layers = num_layers
        self.layout_of_row = layout_of_row
        self.class_of_layer = class_of_layer
        # One representative layer per retention-ratio class: its skip count is the class's.
        self.class_first_layer = np.array(
            [int(np.flatnonzero(class_of_layer == k)[0]) for k in range(num_classes)], dtype=np.int64
        )

        self.tables = CpuGpuBuffer(
            num_layers, max_num_reqs, max_blocks_per_layer, dtype=torch.int32, device=device, pin_memory=pin_memory
        )
        # What vLLM's code calls the block table of the group: layer 0's (only its shape is read).
        self.block_table = self.tables
        self.slot_mapping = CpuGpuBuffer(
            num_layers, max_num_batched_tokens, dtype=torch.int64, device=device, pin_memory=pin_memory
        )
        # Device copies of the tables are kept current by replaying this step's new entries
        # (a few per request while decoding); rows that were added or moved are copied whole.
        self.max_writes = max_num_reqs * num_layers * 4
        self.staged_writes = CpuGpuBuffer(self.max_writes, 4, dtype=torch.int64, device=device, pin_memory=pin_memory)
        self.writes: list[tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]] = []  # layers, rows, columns, ids
        self.rows_changed = False
        self.host_only = device.type == "cpu"
        if self.host_only:
            # As vLLM's CPU runner does with its own buffers: one tensor serves both sides.
            self.tables.gpu = self.tables.cpu
            self.slot_mapping.gpu = self.slot_mapping.cpu
        self.held = np.zeros((max_num_reqs, num_layers), dtype=np.int64)
        self.held_total = np.zeros(max_num_reqs, dtype=np.int64)
        self.pending: dict[int, list[int]] = {}
        # Per row: its request's layout, span and skip count per retention-ratio class.
        self.layouts: list[RequestKVLayout | None] = [None] * max_num_reqs
        self.row_span = np.zeros((max_num_reqs, 2), dtype=np.int64)
        self.row_class_skipped = np.zeros((max_num_reqs, num_classes), dtype=np.int64)
        self.row_skips = np.zeros(max_num_reqs, dtype=bool)
        # Per row and layer, skipped tokens modulo the block size, and per row the whole blocks'
        # worth of skipped tokens over all layers: what a decoding step's blocks follow from.
        self.row_skip_residues = np.zeros((max_num_reqs, num_layers), dtype=np.int64)
        self.row_skipped_full_blocks = np.zeros(max_num_reqs, dtype=np.int64)
        # Per row and retention-ratio class: compacted slots below this already hold this
        # request's KV in shared prefix-cache blocks (written by another request), so the step
        # that recomputes their tokens writes nothing there. 0 once passed.
        self.written = np.zeros((max_num_reqs, num_classes), dtype=np.int64)
        # Requests taken out of the batch while they keep their blocks (not scheduled in a step):
        # their per-layer tables, restored when they come back with the same block list.
        self.parked: dict[RequestKVLayout, tuple[np.ndarray, np.ndarray, int]] = {}
        # Requests coming back from preemption in this step (set by the runner): never restored.
        self.fresh: set[RequestKVLayout] = set()

    # --- vLLM's BlockTable interface ---------------------------------------------------------

    def add_row(self, block_ids: list[int], row_idx: int) -> None:
        self.clear_row(row_idx)
        layout = self.layout_of_row(row_idx)
        self.layouts[row_idx] = layout
        self.row_span[row_idx] = (layout.span_start, layout.span_end)
        self.row_class_skipped[row_idx] = layout.skipped[self.class_first_layer]
        self.row_skips[row_idx] = layout.skips
        self.row_skip_residues[row_idx] = layout.skipped % self.block_size
        self.row_skipped_full_blocks[row_idx] = int((layout.skipped // self.block_size).sum())
        parked = self.parked.pop(layout, None)
        if parked is not None and layout not in self.fresh and parked[2] <= len(block_ids):
            # Back in the batch with the blocks it had (plus any new ones): which layer each
            # block serves depends on the order it was lent in, so restore rather than re-split.
            tables, held, held_total, written = parked
            self.tables.np[:, row_idx, : tables.shape[1]] = tables
            self.held[row_idx] = held
            self.held_total[row_idx] = held_total
            self.written[row_idx] = written
            block_ids = block_ids[held_total:]
        self.rows_changed = True
        self.append_row(block_ids, row_idx)

    def append_row(self, block_ids: list[int], row_idx: int) -> None:
        if block_ids:
            self.pending.setdefault(row_idx, []).extend(block_ids)

    def clear_row(self, row_idx: int) -> None:
        layout = self.layouts[row_idx]
        if layout is not None and self.held_total[row_idx] > 0:
            width = int(self.held[row_idx].max())
            self.parked[layout] = (
                self.tables.np[:, row_idx, :width].copy(), self.held[row_idx].copy(), int(self.held_total[row_idx]),
                self.written[row_idx].copy(),
            )
        self.tables.np[:, row_idx] = 0
        self.held[row_idx] = 0
        self.held_total[row_idx] = 0
        self.pending.pop(row_idx, None)
        self.layouts[row_idx] = None
        self.row_class_skipped[row_idx] = 0
        self.row_skips[row_idx] = False
        self.row_skip_residues[row_idx] = 0
        self.row_skipped_full_blocks[row_idx] = 0
        self.written[row_idx] = 0

    def move_row(self, src: int, tgt: int) -> None:
        self.rows_changed = True
        width = int(self.held[src].max(initial=0))
        self.tables.np[:, tgt, :width] = self.tables.np[:, src, :width]
        for array in self._row_arrays():
            array[tgt] = array[src]
        self.layouts[tgt] = self.layouts[src]
        pending = self.pending.pop(src, None)
        if pending is not None:
            self.pending[tgt] = pending
        else:
            self.pending.pop(tgt, None)

    def swap_row(self, src: int, tgt: int) -> None:
        self.rows_changed = True
        pair, swapped = [src, tgt], [tgt, src]
        self.tables.np[:, pair] = self.tables.np[:, swapped]
        for array in self._row_arrays():
            array[pair] = array[swapped]
        self.layouts[src], self.layouts[tgt] = self.layouts[tgt], self.layouts[src]
        pending_src, pending_tgt = self.pending.pop(src, None), self.pending.pop(tgt, None)
        if pending_src is not None:
            self.pending[tgt] = pending_src
        if pending_tgt is not None:
            self.pending[src] = pending_tgt

    def _row_arrays(self) -> tuple[np.ndarray, ...]:
        """The per-row arrays that move with a row."""
        return (self.held, self.held_total, self.row_span, self.row_class_skipped, self.row_skips,
                self.row_skip_residues, self.row_skipped_full_blocks, self.written)

    def compute_slot_mapping(self, num_reqs: int, query_start_loc: torch.Tensor, positions: torch.Tensor) -> None:
        # The p-MoD runner computes every layer's slot mapping at once (PmodRunnerMixin).
        pass

    def commit_block_table(self, num_reqs: int) -> None:
        if self.host_only:
            return
        writes, self.writes = self.writes, []
        num_writes = sum(len(layers) for layers, _, _, _ in writes)
        if self.rows_changed or num_writes > self.max_writes:
            self.rows_changed = False
            # Layer by layer: each is a contiguous slice of pinned memory, so the copies stay
            # asynchronous (a strided copy would go through pageable memory and wait for the GPU).
            for layer in range(self.num_layers):
                self.tables.gpu[layer, :num_reqs].copy_(self.tables.cpu[layer, :num_reqs], non_blocking=True)
        elif num_writes:
            staged = self.staged_writes.np
            start = 0
            for layers, rows, columns, block_ids in writes:
                end = start + len(layers)
                staged[start:end, 0] = layers
                staged[start:end, 1] = rows
                staged[start:end, 2] = columns
                staged[start:end, 3] = block_ids
                start = end
            self.staged_writes.copy_to_gpu(num_writes)
            layers, rows, columns, block_ids = self.staged_writes.gpu[:num_writes].T
            self.tables.gpu[layers, rows, columns] = block_ids.to(self.tables.gpu.dtype)

    def clear(self) -> None:
        self.tables.gpu.fill_(0)
        self.tables.cpu.fill_(0)

    def get_device_tensor(self, num_reqs: int) -> torch.Tensor:
        return self.tables.gpu[0, :num_reqs]

    def get_cpu_tensor(self) -> torch.Tensor:
        return self.tables.cpu[0]

    def get_numpy_array(self) -> np.ndarray:
        return self.tables.np[0]

    # --- p-MoD ---------------------------------------------------------------------------------

    def forget(self, layout: RequestKVLayout | None) -> None:
        """The request finished or lost its blocks (preemption): its parked tables are void."""
        if layout is not None:
            self.parked.pop(layout, None)

    def layer_tables(self, num_reqs: int) -> torch.Tensor:
        """`[layer, request, block]` device view of the first `num_reqs` rows."""
        return self.tables.gpu[:, :num_reqs]

    def assign_pending(self, num_computed: np.ndarray, num_tokens: np.ndarray) -> None:
        """Give queued new blocks to their layers; `num_tokens[row]` is the row's token count
        at the end of this step (what the scheduler allocated for), `num_computed[row]` at its
        start."""
        if not self.pending:
            return
        rows = np.fromiter(self.pending, dtype=np.int64, count=len(self.pending))
        num_new = np.fromiter(map(len, self.pending.values()), dtype=np.int64, count=len(rows))
        decoding, crossing = self._decode_steps(rows, num_new, num_computed[rows], num_tokens[rows])
        # Anything but a one-token step (prefill, a prefix-cache hit, several tokens at once):
        # row by row.
        for row in rows[~decoding].tolist():
            block_ids = self.pending[row]
            layout = self.layouts[row]
            computed = int(num_computed[row])
            if computed and self.held_total[row] < layout.total_blocks(computed):
                # A prefix-cache hit: its blocks come first, an allocation at `computed` tokens,
                # and every one of them is full.
                num_hit = layout.total_blocks(computed) - int(self.held_total[row])
                self._assign(row, layout, block_ids[:num_hit], computed)
                self.written[row] = layout.layer_blocks(computed)[self.class_first_layer] * self.block_size
                block_ids = block_ids[num_hit:]
            if block_ids:
                self._assign(row, layout, block_ids, int(num_tokens[row]))
        if decoding.any():
            # Decoding rows (most rows of most steps) in one update: each new block goes to the
            # next layer, in layer order, whose count crosses a block boundary.
            decode_rows = rows[decoding]
            row_index, layers = np.nonzero(crossing[decoding])  # row by row, layers ascending
            rows_of_blocks = decode_rows[row_index]
            block_ids = [block for row in decode_rows.tolist() for block in self.pending[row]]
            columns = self.held[rows_of_blocks, layers]
            self.tables.np[layers, rows_of_blocks, columns] = block_ids
            self.held[rows_of_blocks, layers] += 1  # each (row, layer) once
            self.held_total[decode_rows] += num_new[decoding]
            if not self.host_only:
                self.writes.append((layers, rows_of_blocks, columns, block_ids))
        self.pending.clear()

    def _decode_steps(self, rows: np.ndarray, num_new: np.ndarray, num_computed: np.ndarray,
                      num_tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Which of `rows` grow by one token past their visual span (or without one) with the
        blocks they hold serving the token before (`RequestKVLayout.decode_layers`, for all rows
        at once), and `[row, layer]`: the layers whose KV slot count then starts a new block,
        one new block each (as many as the row was lent)."""
        before = num_tokens - 1
        one_token = (before > 0) & (num_computed <= before) & (
            (before >= self.row_span[rows, 1]) | ~self.row_skips[rows])
        # Past the span layer l holds `before - skipped[l]` slots; with before = q * block_size + r
        # and skipped[l] = a[l] * block_size + c[l], that is q - a[l] blocks, one more where
        # c[l] < r, and the next token starts a block where c[l] == r.
        residue = (before % self.block_size)[:, None]
        residues = self.row_skip_residues[rows]
        crossing = residues == residue
        blocks_before = (self.num_layers * (before // self.block_size) - self.row_skipped_full_blocks[rows]
                         + (residues < residue).sum(axis=1))
        decoding = (one_token & (crossing.sum(axis=1) == num_new) & (blocks_before == self.held_total[rows]))
        return decoding, crossing

    def _assign(self, row: int, layout: RequestKVLayout, block_ids: list[int], tokens: int) -> None:
        """Blocks lent at once to top every layer of `row` up to `tokens` tokens, layer after
        layer, each its new blocks in order."""
        num_new = len(block_ids)
        held = self.held[row]
        new = layout.new_blocks_per_layer(held, tokens, num_new)
        layers = np.repeat(np.arange(self.num_layers), new)
        first_of_layer = np.cumsum(new) - new
        columns = held[layers] + np.arange(num_new) - first_of_layer[layers]
        self.tables.np[layers, row, columns] = block_ids
        held += new
        self.held_total[row] += num_new
        if not self.host_only:
            self.writes.append((layers, np.full(num_new, row), columns, block_ids))

    def pass_written(self, num_reqs: int, end: np.ndarray) -> None:
        """Rows whose step ends (`end`: [class, request] compacted counts) at or past the slots
        their shared blocks hold write normally from now on."""
        written = self.written[:num_reqs]
        written[(end.T >= written).all(axis=1)] = 0
