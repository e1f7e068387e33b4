"""Per-layer block tables of the one-group KV layout (no engine): the runner's split of a
request's block list into layers, against an independent per-layer allocator."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from pmod_serve.pmod.kv_layout import RequestKVLayout
from pmod_serve.pmod.schedule import PmodSchedule, kept_target_count
from pmod_serve.pmod.targets import RequestTargets
from pmod_serve.v1.worker.block_table import PmodBlockTable

BLOCK_SIZE = 16
SCHEDULE = PmodSchedule.from_config(
    {"num_hidden_layers": 32, "mod_target_layers": "shiftedcos_decay_0.85_0.15", "mod_router_factor": 0.5,
     "mod_weight_norm": "tanh_0.2_1", "mod_target_token_type": "vision_all", "mod_bias_enabled": True}
)
RATIOS = tuple(SCHEDULE.retention_ratio.get(layer) for layer in range(32))


def expected_layer_blocks(targets: RequestTargets, num_tokens: int) -> list[int]:
    """docs/p-mod.md, "KV cache of one request", per layer, written out independently of RequestKVLayout."""
    start, end = targets.span
    num_targets = targets.num_targets
    blocks = []
    for ratio in RATIOS:
        skipped = num_targets - kept_target_count(num_targets, ratio) if ratio is not None and num_targets else 0
        slots = num_tokens - skipped if num_tokens >= end else num_tokens
        blocks.append(math.ceil(slots / BLOCK_SIZE))
    return blocks


@pytest.mark.parametrize("ranges", [(), ((40, 2968),), ((5, 600), (700, 1300))])
def test_layout_counts_match_the_spec(ranges):
    targets = RequestTargets(tuple(ranges))
    layout = RequestKVLayout(targets, RATIOS, BLOCK_SIZE)
    start, end = targets.span
    # Before the span, after it, and decoding one token at a time (the shortcut's path).
    points = [n for n in range(0, 3200, 7) if not (targets.ranges and start < n < end)]
    points += list(range(max(end, 1), max(end, 1) + 80))
    for n in points:
        assert layout.layer_blocks(n).tolist() == expected_layer_blocks(targets, n), n
        assert layout.total_blocks(n) == sum(expected_layer_blocks(targets, n)), n
    for n in reversed(points):  # one token back at a time past the span: the shortcut backwards
        assert layout.total_blocks(n) == sum(expected_layer_blocks(targets, n)), n
    # The scheduler's decode step: the new count, then (filing the new blocks) the count before
    # it; every query after the first takes a shortcut, never the per-layer sum.
    first = max(end, 1) + 100
    layout.total_blocks(first)
    full_sums = []
    layout.layer_blocks = lambda n: full_sums.append(n) or RequestKVLayout.layer_blocks(layout, n)
    for n in range(first + 1, first + 60):
        assert layout.total_blocks(n) == sum(expected_layer_blocks(targets, n)), n
        assert layout.total_blocks(n - 1) == sum(expected_layer_blocks(targets, n - 1)), n
    assert full_sums == []
    if targets.ranges:
        with pytest.raises(ValueError, match="inside the visual span"):
            layout.layer_slots((start + end) // 2)


def test_split_follows_totals():
    layout = RequestKVLayout(RequestTargets(((40, 2968),)), RATIOS, BLOCK_SIZE)
    held = np.zeros(32, dtype=np.int64)
    for n in (40, 3000, 3001, 3017, 3100):
        target = np.array(expected_layer_blocks(layout.targets, n))
        new = layout.split_new_blocks(held, int(target.sum() - held.sum()))
        held = held + new
        assert held.tolist() == target.tolist()


class Allocator:
    """What the scheduler's manager does: top a request's single list up to the total blocks."""

    def __init__(self) -> None:
        self.next_id = 1
        self.lists: dict[str, list[int]] = {}

    def allocate(self, req: str, layout: RequestKVLayout, num_tokens: int) -> list[int]:
        held = self.lists.setdefault(req, [])
        new = list(range(self.next_id, self.next_id + layout.total_blocks(num_tokens) - len(held)))
        self.next_id += len(new)
        held.extend(new)
        return new


def make_table(layout_of_row, max_num_reqs: int) -> PmodBlockTable:
    classes = sorted(set(RATIOS), key=lambda r: (r is not None, r or 0))
    return PmodBlockTable(
        num_layers=32, num_classes=len(classes), block_size=BLOCK_SIZE, max_num_reqs=max_num_reqs,
        max_blocks_per_layer=256, max_num_batched_tokens=4096, pin_memory=False, device=torch.device("cpu"),
        layout_of_row=layout_of_row, class_of_layer=np.array([classes.index(r) for r in RATIOS]),
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_block_table_keeps_each_layer_its_own_blocks(seed):
    rng = random.Random(seed)
    # Requests with an image (a visual span) and a text-only one.
    spans = [((rng.randint(5, 50), rng.randint(600, 1500)),) if i % 3 else () for i in range(6)]
    requests = {f"r{i}": RequestKVLayout(RequestTargets(span), RATIOS, BLOCK_SIZE) for i, span in enumerate(spans)}
    rows: dict[int, str] = {}
    table = make_table(lambda row: requests[rows[row]], max_num_reqs=8)
    # A separate "device" copy, kept current by commit_block_table's incremental writes.
    table.host_only = False
    table.tables.gpu = table.tables.cpu.clone()
    allocator = Allocator()
    tokens = dict.fromkeys(requests, 0)
    # Each layer's blocks must never change once given: (layer, index) -> block id.
    given: dict[str, dict[tuple[int, int], int]] = {name: {} for name in requests}
    parked: dict[str, list[int]] = {}

    for step in range(120):
        # Requests come and go from the batch (not scheduled in a step: parked, then re-added).
        for name in requests:
            if name not in rows.values() and rng.random() < 0.5:
                row = next(r for r in range(8) if r not in rows)
                rows[row] = name
                table.add_row(parked.pop(name, []), row)
        if rows and rng.random() < 0.2:
            row = rng.choice(list(rows))
            name = rows.pop(row)
            parked[name] = allocator.lists.get(name, [])
            table.clear_row(row)
        if len(rows) >= 2 and rng.random() < 0.2:
            a, b = rng.sample(list(rows), 2)
            table.swap_row(a, b)
            rows[a], rows[b] = rows[b], rows[a]
        num_tokens = np.zeros(8, dtype=np.int64)
        num_computed = np.zeros(8, dtype=np.int64)
        for row, name in rows.items():
            layout = requests[name]
            start, end = layout.span_start, layout.span_end
            n = num_computed[row] = tokens[name]
            if not layout.targets.ranges:
                step_tokens = rng.randint(1, 40)
            elif n < start:
                step_tokens = rng.choice([start - n, rng.randint(1, start - n)])
            elif n < end:
                step_tokens = end - n + rng.randint(0, 30)
            else:
                step_tokens = 1 if rng.random() < 0.8 else rng.randint(2, 40)
            tokens[name] = n + step_tokens
            num_tokens[row] = tokens[name]
            table.append_row(allocator.allocate(name, layout, tokens[name]), row)
        table.assign_pending(num_computed, num_tokens)
        table.commit_block_table(8)
        for row, name in rows.items():
            expected = expected_layer_blocks(requests[name].targets, tokens[name])
            assert table.held[row].tolist() == expected
            per_layer = [table.tables.np[layer, row, : expected[layer]].tolist() for layer in range(32)]
            assert sorted(b for ids in per_layer for b in ids) == sorted(allocator.lists[name])
            for layer, ids in enumerate(per_layer):
                for index, block in enumerate(ids):
                    assert given[name].setdefault((layer, index), block) == block
        # Rows in use read the same on the device (rows out of the batch are never read).
        for row in rows:
            assert torch.equal(table.tables.gpu[:, row], table.tables.cpu[:, row]), (step, row)


def test_decoding_rows_are_filed_in_one_update():
    """A decoding step files every decoding row's new blocks at once (the per-row split,
    `_assign`, is for prefill, prefix-cache hits and multi-token steps only), and each layer
    still gets exactly its blocks: the spec's count per layer, blocks never moved."""
    rng = random.Random(0)
    layouts = [RequestKVLayout(RequestTargets(((rng.randint(5, 50), rng.randint(600, 1500)),) if i % 4 else ()),
                               RATIOS, BLOCK_SIZE) for i in range(12)]
    table = make_table(lambda row: layouts[row], max_num_reqs=12)
    split_rows: list[int] = []
    assign = table._assign
    table._assign = lambda row, *args: split_rows.append(row) or assign(row, *args)
    allocator = Allocator()
    tokens = np.array([layout.span_end + rng.randint(1, 40) for layout in layouts], dtype=np.int64)
    for row, layout in enumerate(layouts):
        table.add_row(allocator.allocate(str(row), layout, int(tokens[row])), row)
    table.assign_pending(np.zeros(12, dtype=np.int64), tokens)
    assert sorted(split_rows) == list(range(12))  # prefill: row by row
    given: dict[tuple[int, int, int], int] = {}
    for step in range(3 * BLOCK_SIZE):
        computed, tokens = tokens, tokens + 1
        chunked = step % 7 == 3  # one row takes five tokens in this step: not a decoding step
        if chunked:
            tokens[5] += 4
        for row, layout in enumerate(layouts):
            table.append_row(allocator.allocate(str(row), layout, int(tokens[row])), row)
        split_rows.clear()
        table.assign_pending(computed, tokens)
        assert split_rows == ([5] if chunked else [])
        for row, layout in enumerate(layouts):
            expected = expected_layer_blocks(layout.targets, int(tokens[row]))
            assert table.held[row].tolist() == expected, (step, row)
            for layer in range(32):
                for index, block in enumerate(table.tables.np[layer, row, : expected[layer]].tolist()):
                    assert given.setdefault((row, layer, index), block) == block
            assert sorted(table.tables.np[:, row][table.tables.np[:, row] > 0].tolist()) == allocator.lists[str(row)]
