"""Model-runner hooks: every p-MoD layer gets its own compacted index space, all in one KV group.

In a p-MoD layer, a request's kept tokens (its text and the layer's top-k visual tokens, in
position order) are numbered 0, 1, 2, ...; kept token `c` is cached at slot
`table[layer][c // block_size] * block_size + c % block_size`. The counts are known before the
forward pass (`trunc(T*ratio)` per request and layer); only *which* visual tokens are kept is
decided inside it, and that changes no slot. RoPE uses the original positions (applied to q/k
before caching), so attention over the compacted sequence is attention over the kept tokens,
and every attention backend runs unchanged.

The whole decoder is one KV cache group (`pmod_serve.v1.core.kv_cache_manager`). Per step, with host work
that does not grow with the number of layers or retention ratios:
- new blocks go to their layers (`PmodBlockTable.assign_pending`), and the stacked
  `[layer, request, block]` table reaches the device in one copy;
- the compacted lengths of every retention-ratio *class* are computed at once (`[class,
  request]` numpy arrays), copied in one transfer per field into persistent buffers;
- every layer's slot mapping comes from one batched gather over `[layer, token]` (on the host for
  small steps, on the device for large ones);
- attention metadata: with FlashAttention (GPUs) and the CPU backend, one build per step, class
  0's; every other class's is a copy with its own lengths (and with FlashAttention no FA3
  ahead-of-time scheduler metadata: FA3 schedules inside the kernel; on the CPU its own call of
  the kernel's scheduler), as `_class_field_deriver` explains. Other backends build once per
  class (each class has its own builder, so CUDA graphs read per-class buffers), and once per
  step when no request has skipped a token yet (text only: equal lengths in every class). The
  other layers of a class take its metadata with their own block table and slot mapping
  (`update_block_table`, vLLM's own shortcut for exactly that).

Overrides of vLLM's V1 `GPUModelRunner` (shared by `CPUModelRunner`): `get_kv_cache_spec`,
`initialize_kv_cache`, `_cleanup_profiling_kv_cache`, `_update_states`, `_prepare_inputs`, `_get_slot_mappings`, `_build_attention_metadata`,
`_determine_batch_execution_and_padding` and `_dummy_run`.

CUDA graphs. Steps that route nothing (decoding, text) run vLLM's defaults: torch.compile and
full or piecewise CUDA graphs. A graph bakes in the addresses its kernels read, so the block
tables, slot mappings and per-class `query_start_loc`/`seq_lens` live in persistent buffers that
every step rewrites. Steps that route visual tokens (prefill) run eagerly.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from vllm.model_executor.models.utils import extract_layer_index
from vllm.platforms import current_platform
from vllm.utils.platform_utils import is_pin_memory_available
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.attention.backends.utils import NULL_BLOCK_ID  # padded CUDA-graph rows point there
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheSpec
from vllm.v1.utils import CpuGpuBuffer, record_function_or_nullcontext

from pmod_serve import envs
from pmod_serve.pmod.kv_layout import RequestKVLayout, compacted_counts
from pmod_serve.pmod.routing import PmodRouting, RoutingPlan
from pmod_serve.pmod.schedule import PmodSchedule
from pmod_serve.pmod.targets import TargetPolicy
from pmod_serve.v1.core.kv_cache_manager import PmodAttentionSpec, register_kv_cache_spec
from pmod_serve.v1.worker.block_table import PmodBlockTable

# Both workers refuse vLLM's V2 model runner: every override here is a V1 runner method.
V1_RUNNER_REQUIRED = "p-MoD needs vLLM's V1 model runner: set VLLM_USE_V2_MODEL_RUNNER=0"

# Steps of at most this many tokens get their slot mappings from the host (see _pmod_slot_mapping).
HOST_SLOT_MAPPING_MAX_TOKENS = 512


@dataclass
class PmodStep:
    """This step's compacted attention inputs, per retention-ratio class."""

    num_reqs: int
    num_tokens: np.ndarray  # [class] compacted tokens in the step
    max_query_len: np.ndarray  # [class]
    max_seq_len: np.ndarray  # [class]
    num_scheduled_tokens: int  # uncompacted
    # No request of the step has skipped a token yet (text only, or before its images): every
    # class has the same compacted lengths, so one attention-metadata build serves all layers.
    classes_identical: bool
    end: np.ndarray  # [class, request] compacted tokens at the end of the step
    # Some request recomputes tokens whose slots shared prefix-cache blocks already hold.
    writes_shared: bool


class PmodStack:
    """The p-MoD KV layout of one KV cache config: layers, retention-ratio classes, buffers."""

    def __init__(self, runner, spec: PmodAttentionSpec, attn_group) -> None:
        device = torch.device(runner.device)
        self.layer_names = list(spec.layer_names)
        self.block_size = spec.block_size
        # Layers with equal retention ratios compact a request identically: one class each.
        self.class_ratios: list[float | None] = sorted(set(spec.retention_ratios), key=lambda r: (r is not None, r or 0))
        class_index = {ratio: k for k, ratio in enumerate(self.class_ratios)}
        self.class_of_layer = np.array([class_index[r] for r in spec.retention_ratios], dtype=np.int64)
        self.class_layers = [np.flatnonzero(self.class_of_layer == k) for k in range(self.num_classes)]
        num_classes, max_num_reqs, max_num_tokens = self.num_classes, runner.max_num_reqs, runner.max_num_tokens
        pin = device.type != "cpu" and is_pin_memory_available()

        def buffer(*size, dtype):
            buf = CpuGpuBuffer(*size, dtype=dtype, device=device, pin_memory=pin)
            if device.type == "cpu":
                buf.gpu = buf.cpu
            return buf

        self.query_start_loc = buffer(num_classes, max_num_reqs + 1, dtype=torch.int32)
        self.seq_lens = buffer(num_classes, max_num_reqs, dtype=torch.int32)
        self.num_computed = torch.zeros(num_classes, max_num_reqs, dtype=torch.int32)
        # Compacted index and request (batch row) of every kept token, per class; -1 = none.
        # Token-major, so a step's rows are one contiguous (asynchronous) host-to-device copy;
        # `*_by_class` are class-major views of the same memory.
        self.kept_index = buffer(max_num_tokens, num_classes, dtype=torch.int64)
        self.kept_request = buffer(max_num_tokens, num_classes, dtype=torch.int64)
        self.kept_index_by_class = self.kept_index.np.T
        # The step's routing (pmod_serve.pmod.routing), pinned: the copies do not wait for the GPU.
        self.layer_ratios = list(spec.retention_ratios)
        self.target_index = buffer(max_num_tokens, dtype=torch.int64)
        self.target_segment = buffer(max_num_tokens, dtype=torch.int64)
        self.segment_start = buffer(max_num_reqs + 1, dtype=torch.int64)
        self.kept_targets = buffer(len(self.layer_names) * (max_num_reqs + 1), dtype=torch.int64)
        # Host-computed slot mappings of small steps, `[layer, token]` packed (pinned).
        self.staged_slots = buffer(len(self.layer_names) * min(max_num_tokens, HOST_SLOT_MAPPING_MAX_TOKENS), dtype=torch.int64)
        # `PmodBlockTable.written` for the device path of large steps after a prefix-cache hit (pinned).
        self.staged_written = buffer(max_num_reqs, num_classes, dtype=torch.int64)
        self.kept_request_by_class = self.kept_request.np.T
        self.class_of_layer_gpu = torch.from_numpy(self.class_of_layer).to(device)
        self.layer_arange = np.arange(len(self.layer_names))[:, None]
        self.layer_arange_gpu = torch.from_numpy(self.layer_arange).to(device)

        self.table = PmodBlockTable(
            num_layers=len(self.layer_names),
            num_classes=num_classes,
            block_size=self.block_size,
            max_num_reqs=max_num_reqs,
            max_blocks_per_layer=spec.max_num_blocks_per_req(runner.vllm_config, runner.max_model_len),
            max_num_batched_tokens=max_num_tokens,
            pin_memory=pin,
            device=device,
            layout_of_row=runner._pmod_layout_of_row,
            class_of_layer=self.class_of_layer,
        )
        builder_spec = attn_group.get_metadata_builder().kv_cache_spec
        builder_cls = attn_group.backend.get_builder_cls()

        def make_builder(layers) -> object:
            return builder_cls(builder_spec, [self.layer_names[layer] for layer in layers], runner.vllm_config, device)

        builder = make_builder(range(len(self.layer_names)))
        # Where the backend allows it, one build per step (class 0's) and the other classes'
        # metadata derived from it; otherwise one builder per class (under CUDA graphs each keeps
        # its own persistent state).
        self.class_field_deriver = _class_field_deriver(builder)
        if self.class_field_deriver is not None:
            self.builders = [builder]
        else:
            self.builders = [make_builder(layers) for layers in self.class_layers]
        # FlashAttention's per-class AOT scheduler metadata, stacked (see below); None otherwise.
        self.scheduler_metadata: torch.Tensor | None = None
        self.shared_builds = self.class_field_deriver is None and self._stack_persistent_builder_state(runner)
        self._request_views: dict[int, tuple[list[tuple], list[torch.Tensor]]] = {}
        self._slot_views: dict[tuple[int, ...], list[torch.Tensor]] = {}

    def _stack_persistent_builder_state(self, runner) -> bool:
        """Whether one class's metadata build may serve every layer when the classes' lengths
        are equal. A full CUDA graph reads each class builder's persistent buffers, so that is
        allowed only where those buffers are known and kept equal: none without full graphs;
        FlashAttention's AOT scheduler metadata, stacked here so one copy refreshes all."""
        if not runner.compilation_config.cudagraph_mode.has_full_cudagraphs():
            return True
        from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadataBuilder

        if type(self.builders[0]) is not FlashAttentionMetadataBuilder:
            return False
        buffers = [getattr(builder, "scheduler_metadata", None) for builder in self.builders]
        if any(buffer is None for buffer in buffers):
            return not any(buffer is not None for buffer in buffers)
        self.scheduler_metadata = torch.stack(buffers)
        for builder, row in zip(self.builders, self.scheduler_metadata):
            builder.scheduler_metadata = row
        return True

    def share_class_build(self) -> None:
        """After a build of class 0 that stands for every class: the other classes' persistent
        builder state (read by full CUDA graphs) takes its values."""
        stacked = self.scheduler_metadata
        if stacked is not None:
            stacked[1:].copy_(stacked[0].expand_as(stacked[1:]))

    @property
    def num_classes(self) -> int:
        return len(self.class_ratios)

    def request_views(self, num_reqs: int) -> tuple[list[tuple], list[torch.Tensor]]:
        """Per class: device and host views of its request-indexed buffers, and per layer its
        block table, for batches of `num_reqs` rows (cached: most steps repeat a batch size)."""
        views = self._request_views.get(num_reqs)
        if views is None:
            if len(self._request_views) > 64:
                self._request_views.clear()
            per_class = [
                (
                    self.query_start_loc.gpu[k, : num_reqs + 1],
                    self.query_start_loc.cpu[k, : num_reqs + 1],
                    self.seq_lens.gpu[k, :num_reqs],
                    self.seq_lens.cpu[k, :num_reqs],
                    self.num_computed[k, :num_reqs],
                )
                for k in range(self.num_classes)
            ]
            tables = self.table.layer_tables(num_reqs)
            views = self._request_views[num_reqs] = (per_class, list(tables.unbind(0)))
        return views

    def slot_views(self, class_slots: tuple[int, ...]) -> list[torch.Tensor]:
        """Per layer: its slot mapping, `class_slots[k]` tokens long for the layers of class
        `k` (cached like `request_views`: decode steps repeat their lengths)."""
        views = self._slot_views.get(class_slots)
        if views is None:
            if len(self._slot_views) > 256:
                self._slot_views.clear()
            slot_mapping = self.table.slot_mapping.gpu
            views = self._slot_views[class_slots] = [
                slot_mapping[layer, : class_slots[k]] for layer, k in enumerate(self.class_of_layer.tolist())
            ]
        return views


class PmodRunnerMixin:
    """Mixed into vLLM's V1 GPU or CPU model runner for p-MoD models."""

    _pmod_stack: PmodStack | None = None
    _pmod_step: PmodStep | None = None
    _pmod_routing: PmodRouting | None = None
    _pmod_layouts: dict[str, RequestKVLayout] | None = None
    _pmod_policy: TargetPolicy | None = None

    # --- KV cache layout ----------------------------------------------------------------

    def get_kv_cache_spec(self) -> dict[str, KVCacheSpec]:
        """The whole decoder as one spec, reported under its first layer's name: vLLM then
        sizes the pool in single-layer pages and makes one KV cache group."""
        register_kv_cache_spec()
        schedule = PmodSchedule.from_config(self.model_config.hf_config)
        specs = super().get_kv_cache_spec()
        for layer_name, spec in specs.items():
            if type(spec) is not FullAttentionSpec:
                raise ValueError(f"p-MoD: unexpected KV cache spec {type(spec).__name__} for {layer_name}")
        names = sorted(specs, key=extract_layer_index)
        first = specs[names[0]]
        if any(specs[name] != first for name in names):
            raise ValueError("p-MoD: attention layers with different KV cache specs")
        fields = {name: getattr(first, name) for name in first.__dataclass_fields__}
        ratios = tuple(schedule.retention_ratio.get(extract_layer_index(name)) for name in names)
        return {names[0]: PmodAttentionSpec(**fields, layer_names=tuple(names), retention_ratios=ratios)}

    def initialize_kv_cache(self, kv_cache_config, *args, **kwargs) -> None:
        # The engine planned one tensor for one (stacked) layer: every layer shares it, as they
        # share the pool's blocks, and they form the group's layers.
        kv_cache_config = copy.deepcopy(kv_cache_config)
        (group,) = kv_cache_config.kv_cache_groups
        spec = group.kv_cache_spec
        if not isinstance(spec, PmodAttentionSpec):
            raise ValueError(f"p-MoD: expected one PmodAttentionSpec KV cache group, got {type(spec).__name__}")
        group.layer_names = list(spec.layer_names)
        (tensor,) = kv_cache_config.kv_cache_tensors
        tensor.shared_by = list(spec.layer_names)
        self._pmod_stack = None
        super().initialize_kv_cache(kv_cache_config, *args, **kwargs)
        if self.parallel_config.use_ubatching:
            raise NotImplementedError("p-MoD: micro-batched steps (DBO) are not supported")
        kv_block_table = self.input_batch.block_table[0]
        if kv_block_table.block_size != spec.block_size:
            raise ValueError(
                f"p-MoD: the attention backend's kernel block size {kv_block_table.block_size} differs from "
                f"the KV block size {spec.block_size}; choose a --block-size the backend supports"
            )
        ((attn_group,),) = self.attn_groups
        stack = PmodStack(self, spec, attn_group)
        self.input_batch.block_table.block_tables[0] = stack.table
        self._pmod_layouts = {}
        self._pmod_stack = stack

    def _cleanup_profiling_kv_cache(self) -> None:
        # vLLM's CUDA-graph memory profiling runs on a minimal KV cache, then drops it.
        super()._cleanup_profiling_kv_cache()
        self._pmod_stack = None

    def _pmod_layout_of_row(self, row: int) -> RequestKVLayout:
        req_id = self.input_batch.req_ids[row]
        layout = self._pmod_layouts.get(req_id)
        if layout is None:
            if self._pmod_policy is None:
                # The model read its image layout when it was built.
                layout = self._pmod_model().layout
                self._pmod_policy = TargetPolicy.from_config(self.model_config.hf_config, layout)
            state = self.requests[req_id]
            targets = self._pmod_policy.targets_of(state.mm_features, state.num_prompt_tokens)
            spec = self.kv_cache_config.kv_cache_groups[0].kv_cache_spec
            layout = self._pmod_layouts[req_id] = RequestKVLayout(targets, spec.retention_ratios, spec.block_size)
        return layout

    def _update_states(self, scheduler_output):
        stack = self._pmod_stack
        if stack is None:
            return super()._update_states(scheduler_output)
        # Preempted requests come back with a fresh block list: their old tables are void (also
        # when vLLM takes a resumed request out of the batch first, which parks them again).
        resumed = scheduler_output.scheduled_cached_reqs.resumed_req_ids
        stack.table.fresh = {self._pmod_layouts[r] for r in resumed if r in self._pmod_layouts}
        try:
            result = super()._update_states(scheduler_output)
        finally:
            stack.table.fresh = set()
        for req_id in scheduler_output.finished_req_ids:
            stack.table.forget(self._pmod_layouts.pop(req_id, None))
        if stack.table.parked or len(self._pmod_layouts) > len(self.requests) + self.max_num_reqs:
            # Whatever belongs to no live request can never come back.
            self._pmod_layouts = {r: layout for r, layout in self._pmod_layouts.items() if r in self.requests}
            live = set(self._pmod_layouts.values())
            for layout in [layout for layout in stack.table.parked if layout not in live]:
                stack.table.forget(layout)
        return result

    # --- per step -----------------------------------------------------------------------

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens: np.ndarray):
        stack = self._pmod_stack
        self._pmod_step = None
        self._pmod_routing = None
        if stack is None:
            self._pmod_model().set_pmod_routing(None)
            return super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        num_reqs = self.input_batch.num_reqs
        num_computed = self.input_batch.num_computed_tokens_cpu[:num_reqs].astype(np.int64)
        num_sched = num_scheduled_tokens[:num_reqs].astype(np.int64)
        # Before vLLM copies the block table to the device (first thing it does).
        stack.table.assign_pending(num_computed, num_computed + num_sched)
        result = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)

        with record_function_or_nullcontext("pmod: compacted lengths, slots and routing"):
            self._pmod_step = self._compact(stack, num_computed, num_sched)
            self._pmod_slot_mapping(stack, self._pmod_step.num_scheduled_tokens)
            if self._pmod_step.writes_shared:
                stack.table.pass_written(num_reqs, self._pmod_step.end)
            routing = self._routing_for_step(stack, num_computed, num_sched)
        self._pmod_routing = routing
        self._pmod_model().set_pmod_routing(routing)
        return result

    def _compact(self, stack: PmodStack, num_computed: np.ndarray, num_sched: np.ndarray) -> PmodStep:
        """Every class's compacted `query_start_loc`, `seq_lens` and kept-token indices."""
        table = stack.table
        num_reqs = len(num_computed)
        skipped = table.row_class_skipped[:num_reqs].T  # [class, request]
        span_start, span_end = table.row_span[:num_reqs, 0], table.row_span[:num_reqs, 1]

        def compacted(num_tokens: np.ndarray) -> np.ndarray:
            return compacted_counts(num_tokens, skipped, span_start, span_end, table.row_skips[:num_reqs])

        start = compacted(num_computed)
        end = compacted(num_computed + num_sched)
        query_lens = end - start
        query_start_loc = stack.query_start_loc.np
        query_start_loc[:, 0] = 0
        np.cumsum(query_lens, axis=1, out=query_start_loc[:, 1 : num_reqs + 1])
        num_tokens = query_start_loc[:, num_reqs].astype(np.int64)
        # Padded requests (CUDA graphs) hold no tokens: keep query_start_loc non-decreasing.
        query_start_loc[:, num_reqs + 1 :] = query_start_loc[:, num_reqs : num_reqs + 1]
        seq_lens = stack.seq_lens.np
        seq_lens[:, :num_reqs] = end
        seq_lens[:, num_reqs:] = 0
        stack.num_computed[:, :num_reqs] = torch.from_numpy(start)
        stack.num_computed[:, num_reqs:] = 0

        total = int(num_sched.sum())
        kept_index, kept_request = stack.kept_index_by_class, stack.kept_request_by_class
        if (query_lens == 1).all():
            # Decoding only: one token per request in every class.
            kept_index[:, :num_reqs] = end - 1
            kept_request[:, :num_reqs] = np.arange(num_reqs)
        else:
            kept_index[:, :total] = -1
            kept_request[:, :total] = 0
            flat_lens = query_lens.ravel()
            segment = np.repeat(np.arange(flat_lens.size), flat_lens)  # (class, request) of each token
            segment_start = np.cumsum(flat_lens) - flat_lens
            within = np.arange(segment.size) - segment_start[segment]
            cls, req = np.divmod(segment, num_reqs)
            column = query_start_loc[cls, req] + within
            kept_index[cls, column] = start.ravel()[segment] + within
            kept_request[cls, column] = req
        stack.query_start_loc.copy_to_gpu()
        stack.seq_lens.copy_to_gpu()
        stack.kept_index.copy_to_gpu(total)
        stack.kept_request.copy_to_gpu(total)
        return PmodStep(
            num_reqs=num_reqs,
            num_tokens=num_tokens,
            max_query_len=query_lens.max(axis=1, initial=0),
            max_seq_len=end.max(axis=1, initial=0),
            num_scheduled_tokens=total,
            classes_identical=bool((end == end[0]).all() and (start == start[0]).all()),
            end=end,
            writes_shared=bool(table.written[:num_reqs].any()),
        )

    def _pmod_slot_mapping(self, stack: PmodStack, num_tokens: int) -> None:
        """Every layer's slot mapping at once: `[layer, token]`, -1 where a class has no token.

        Small steps (decoding) are computed on the host, from the host copies of the tables and
        indices, and reach the device in one copy: cheaper than the ten device ops of a gather;
        large steps (prefill) gather on the device. Slots that shared prefix-cache blocks already
        hold (`PmodBlockTable.written`) get -1 (in the first step after a hit)."""
        block_size = stack.block_size
        table = stack.table
        writes_shared = self._pmod_step.writes_shared
        if table.host_only or num_tokens <= HOST_SLOT_MAPPING_MAX_TOKENS:
            kept_index = stack.kept_index_by_class[stack.class_of_layer, :num_tokens]
            kept_request = stack.kept_request_by_class[stack.class_of_layer, :num_tokens]
            index = np.maximum(kept_index, 0)
            blocks = table.tables.np[stack.layer_arange, kept_request, index // block_size]
            slots = blocks.astype(np.int64) * block_size + index % block_size
            if writes_shared:
                written = table.written[kept_request, stack.class_of_layer[:, None]]
                kept_index = np.where(kept_index >= written, kept_index, -1)
            if table.host_only:
                # CPU: the host arrays are the device's.
                table.slot_mapping.np[:, :num_tokens] = np.where(kept_index >= 0, slots, -1)
                return
            # One contiguous pinned copy, then a device-side strided copy into the rows.
            staged = stack.staged_slots.np[: slots.size].reshape(slots.shape)
            np.copyto(staged, np.where(kept_index >= 0, slots, -1))
            stack.staged_slots.copy_to_gpu(slots.size)
            table.slot_mapping.gpu[:, :num_tokens].copy_(stack.staged_slots.gpu[: slots.size].view(slots.shape))
            return
        kept_index = stack.kept_index.gpu[:num_tokens].T[stack.class_of_layer_gpu]
        kept_request = stack.kept_request.gpu[:num_tokens].T[stack.class_of_layer_gpu]
        index = kept_index.clamp(min=0)
        blocks = table.tables.gpu[stack.layer_arange_gpu, kept_request, index // block_size]
        slots = blocks.to(torch.int64) * block_size + index % block_size
        if writes_shared:
            # Through pinned memory: a copy from the table's (pageable) array would wait for the
            # GPU to finish the previous step, in every image prefill after a hit (the chat
            # template's blocks hit for every request), and lose async scheduling's overlap.
            num_reqs = self._pmod_step.num_reqs
            stack.staged_written.np[:num_reqs] = table.written[:num_reqs]
            written = stack.staged_written.copy_to_gpu(num_reqs)
            kept_index = torch.where(kept_index >= written[kept_request, stack.class_of_layer_gpu[:, None]], kept_index, -1)
        table.slot_mapping.gpu[:, :num_tokens] = torch.where(kept_index >= 0, slots, -1)

    def _routing_for_step(self, stack: PmodStack, num_computed: np.ndarray, num_sched: np.ndarray) -> PmodRouting | None:
        """Batch indices of the target tokens prefilled in this step (all or none of a request's)."""
        table = stack.table
        num_reqs = len(num_computed)
        span_start, span_end = table.row_span[:num_reqs, 0], table.row_span[:num_reqs, 1]
        routed = (span_end > span_start) & (num_computed <= span_start) & (span_end <= num_computed + num_sched)
        if not routed.any():
            return None
        batch_start = np.cumsum(num_sched) - num_sched
        pieces = []
        for row in np.flatnonzero(routed):
            ranges = table.layouts[row].targets.ranges
            step_start = int(num_computed[row]) - int(batch_start[row])
            pieces.append(np.concatenate([np.arange(start, end) for start, end in ranges]) - step_start)
        plan = RoutingPlan.of([len(piece) for piece in pieces], stack.layer_ratios)
        num_targets, num_segments = int(plan.segment_start[-1]), len(plan.segment_start)
        stack.target_index.np[:num_targets] = np.concatenate(pieces)
        stack.target_segment.np[:num_targets] = plan.target_segment
        stack.segment_start.np[:num_segments] = plan.segment_start
        kept_size = plan.kept_targets.size
        stack.kept_targets.np[:kept_size] = plan.kept_targets.reshape(-1)
        for buffer, size in ((stack.target_index, num_targets), (stack.target_segment, num_targets),
                             (stack.segment_start, num_segments), (stack.kept_targets, kept_size)):
            buffer.copy_to_gpu(size)
        return PmodRouting(
            target_index=stack.target_index.gpu[:num_targets],
            target_segment=stack.target_segment.gpu[:num_targets],
            segment_start=stack.segment_start.gpu[:num_segments],
            kept_targets=stack.kept_targets.gpu[:kept_size].view(len(stack.layer_ratios), num_segments),
            num_skipped=plan.num_skipped,
            segments=plan.segments,
        )

    def _determine_batch_execution_and_padding(self, *args, **kwargs):
        # Routing (top-k, gathers of a data-dependent size) never runs inside a CUDA graph.
        if self._pmod_routing is not None:
            kwargs["force_eager"] = True
        return super()._determine_batch_execution_and_padding(*args, **kwargs)

    def _get_slot_mappings(self, num_tokens_padded, num_reqs_padded, num_tokens_unpadded, ubatch_slices=None):
        stack = self._pmod_stack
        if stack is None:
            return super()._get_slot_mappings(num_tokens_padded, num_reqs_padded, num_tokens_unpadded, ubatch_slices)
        if ubatch_slices is not None:
            raise NotImplementedError("p-MoD: micro-batched steps are not supported")
        slot_mapping = stack.table.slot_mapping.gpu
        step = self._pmod_step
        if step is None:
            # Profiling, warm-up and capture batches write no KV.
            slot_mapping[:, :num_tokens_padded].fill_(-1)
            lengths = np.full(stack.num_classes, num_tokens_unpadded, dtype=np.int64)
        else:
            slot_mapping[:, num_tokens_unpadded:num_tokens_padded].fill_(-1)
            lengths = step.num_tokens
        padding = num_tokens_padded - num_tokens_unpadded
        views = stack.slot_views(tuple((lengths + padding).tolist()))
        return {0: slot_mapping[0, :num_tokens_padded]}, dict(zip(stack.layer_names, views))

    def _build_attention_metadata(self, *args, **kwargs):
        stack = self._pmod_stack
        if stack is None:
            return super()._build_attention_metadata(*args, **kwargs)
        if args:
            raise TypeError("p-MoD: _build_attention_metadata expects keyword arguments (vLLM 0.26)")
        if kwargs.get("ubatch_slices") is not None:
            raise NotImplementedError("p-MoD: micro-batched steps are not supported")
        with record_function_or_nullcontext("pmod: attention metadata"):
            return self._build_pmod_attention_metadata(stack, **kwargs), None

    def _build_pmod_attention_metadata(
        self,
        stack: PmodStack,
        *,
        num_tokens: int,
        num_reqs: int,
        max_query_len: int,
        num_tokens_padded: int | None = None,
        num_reqs_padded: int | None = None,
        for_cudagraph_capture: bool = False,
        **_: object,
    ) -> dict:
        num_tokens_padded = num_tokens_padded or num_tokens
        num_reqs_padded = num_reqs_padded or num_reqs
        padding = num_tokens_padded - num_tokens
        step = self._pmod_step

        class_views, tables = stack.request_views(num_reqs_padded)
        if num_reqs_padded > num_reqs:
            # Padded rows of a CUDA-graph batch read the null block.
            stack.table.layer_tables(num_reqs_padded)[:, num_reqs:].fill_(NULL_BLOCK_ID)
        num_computed_full = self.input_batch.num_computed_tokens_cpu_tensor[:num_reqs_padded]
        is_prefilling = num_computed_full < self.input_batch.num_prompt_tokens_cpu_tensor[:num_reqs_padded]
        is_prefilling[num_reqs:] = False
        if step is None:
            # Dummy batches: no images, so every class has vLLM's own lengths; CUDA graphs read
            # the class buffers, so the values go there.
            stack.query_start_loc.gpu[:, : num_reqs_padded + 1].copy_(
                self.query_start_loc.gpu[None, : num_reqs_padded + 1], non_blocking=True
            )
            stack.seq_lens.gpu[:, :num_reqs_padded].copy_(self.seq_lens[None, :num_reqs_padded], non_blocking=True)
            seq_lens_cpu = self.optimistic_seq_lens_cpu[:num_reqs_padded]
            max_seq_len = self.max_model_len if for_cudagraph_capture else int(seq_lens_cpu[:num_reqs].max())

        layer_names = stack.layer_names
        if step is not None:
            class_slots = stack.slot_views(tuple((step.num_tokens + padding).tolist()))
        else:
            class_slots = stack.slot_views((num_tokens + padding,) * stack.num_classes)

        def class_lengths(k: int) -> dict:
            """Class `k`'s length fields, shared by its build and its derived metadata."""
            query_start_loc, _, seq_lens, _, _ = class_views[k]
            if step is None:
                return dict(num_actual_tokens=num_tokens + padding, max_query_len=max_query_len,
                            max_seq_len=max_seq_len, query_start_loc=query_start_loc, seq_lens=seq_lens)
            return dict(
                num_actual_tokens=int(step.num_tokens[k]) + padding,
                max_query_len=int(step.max_query_len[k]),
                max_seq_len=self.max_model_len if for_cudagraph_capture else int(step.max_seq_len[k]),
                query_start_loc=query_start_loc,
                seq_lens=seq_lens,
            )

        def class_metadata(k: int) -> CommonAttentionMetadata:
            lengths = class_lengths(k)
            _, query_start_loc_cpu, _, seq_lens_cpu_k, num_computed_k = class_views[k]
            if step is not None:
                common = dict(
                    query_start_loc_cpu=query_start_loc_cpu,
                    _seq_lens_cpu=seq_lens_cpu_k,
                    _num_computed_tokens_cpu=num_computed_k,
                    seq_lens_cpu_upper_bound=seq_lens_cpu_k,
                    positions=stack.kept_index.gpu[: lengths["num_actual_tokens"], k],
                )
            else:
                common = dict(
                    query_start_loc_cpu=self.query_start_loc.cpu[: num_reqs_padded + 1],
                    _seq_lens_cpu=seq_lens_cpu,
                    _num_computed_tokens_cpu=num_computed_full,
                    seq_lens_cpu_upper_bound=seq_lens_cpu,
                    positions=self.positions[:num_tokens_padded],
                )
            first = int(stack.class_layers[k][0])
            return CommonAttentionMetadata(
                **common,
                **lengths,
                num_reqs=num_reqs_padded,
                block_table_tensor=tables[first],
                slot_mapping=class_slots[first],
                causal=True,
                is_prefilling=is_prefilling,
            )

        def build(builder, metadata: CommonAttentionMetadata):
            if for_cudagraph_capture:
                return builder.build_for_cudagraph_capture(metadata)
            return builder.build(common_prefix_len=0, common_attn_metadata=metadata)

        attn_metadata = {}
        if stack.class_field_deriver is not None:
            # One build (class 0); every other class takes it with its own lengths (under full
            # CUDA graphs, captured that way too) and what the backend derives from them, once
            # for all classes where their lengths are equal (no request has skipped a token).
            (builder,) = stack.builders
            built = build(builder, class_metadata(0))
            derive = stack.class_field_deriver
            same_lengths = step is None or step.classes_identical
            common_fields = derive(class_lengths(0)) if same_lengths else None
            derived = [None]
            for k in range(1, stack.num_classes):
                lengths = class_lengths(k)
                derived.append({**(derive(lengths) if common_fields is None else common_fields), **lengths})
            for layer, (name, k) in enumerate(zip(layer_names, stack.class_of_layer.tolist())):
                if k == 0:
                    attn_metadata[name] = _with_layer_kv(builder, built, tables[layer], class_slots[layer])
                else:
                    attn_metadata[name] = _with_fields(built, derived[k], block_table=tables[layer], slot_mapping=class_slots[layer])
            return attn_metadata

        shared = step is not None and step.classes_identical and stack.shared_builds and not for_cudagraph_capture
        for k, layers in enumerate(stack.class_layers):
            builder = stack.builders[k]
            built = build(builder, class_metadata(k))
            if shared:
                # Every class has these lengths: class 0's build serves all layers.
                stack.share_class_build()
                for layer, name in enumerate(layer_names):
                    attn_metadata[name] = _with_layer_kv(builder, built, tables[layer], class_slots[layer])
                return attn_metadata
            attn_metadata[layer_names[layers[0]]] = built
            for layer in layers[1:]:
                attn_metadata[layer_names[layer]] = _with_layer_kv(builder, built, tables[layer], class_slots[layer])
        return attn_metadata

    def _dummy_run(self, *args, **kwargs):
        # Profiling, warm-up and capture batches carry no images: nothing to route or compact.
        self._pmod_step = None
        self._pmod_routing = None
        self._pmod_model().set_pmod_routing(None)
        return super()._dummy_run(*args, **kwargs)

    def _pmod_model(self):
        model = self.get_model()
        return model.unwrap() if hasattr(model, "unwrap") else model


def _class_field_deriver(builder) -> Callable[[dict], dict] | None:
    """Where a backend's attention metadata for a retention-ratio class can be derived from
    another class's build (`_with_fields`): a function from the class's length fields (those of
    `class_lengths`) to the other fields it sets besides its lengths, block table and slot
    mapping. None where it cannot.

    vLLM 0.26's FlashAttention metadata depends on a step's lengths only through
    `num_actual_tokens`, `max_query_len`, `query_start_loc`, `max_seq_len` and `seq_lens`, and
    through FA3's optional ahead-of-time scheduler metadata: without it, FA3 schedules inside the
    attention call from `seq_lens` (the same computation, on the device; a full CUDA graph
    captures it), instead of one host call per class and step. Decode context parallelism and
    R-SWA add length-dependent fields, so they keep one build per class. The CPU backend's
    decoder metadata has the same length fields and the kernel's scheduler metadata, which it
    needs: each class gets its own, by the call `CPUAttentionMetadataBuilder.build` makes (the
    rest of a build per class is what is saved). Other backends keep one build per class."""
    from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadataBuilder

    if envs.PMOD_ATTENTION_METADATA_PER_CLASS:
        return None
    if type(builder) is FlashAttentionMetadataBuilder and builder.dcp_world_size == 1 and builder.rswa_window is None:
        return lambda lengths: {"scheduler_metadata": None}
    if current_platform.is_cpu():
        return _cpu_class_field_deriver(builder)
    return None


def _cpu_class_field_deriver(builder) -> Callable[[dict], dict] | None:
    import vllm.envs as vllm_envs
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadataBuilder

    if type(builder) is not CPUAttentionMetadataBuilder or builder.is_cross_attention or builder.is_encoder_only_attention:
        return None

    def scheduler_metadata(lengths: dict) -> dict:
        query_start_loc = lengths["query_start_loc"]
        return {"scheduler_metadata": ops.cpu_attn_get_scheduler_metadata(
            num_reqs=query_start_loc.shape[0] - 1, num_heads=builder.num_heads, num_kv_heads=builder.num_kv_heads,
            head_dim=builder.head_dim, seq_lens=lengths["seq_lens"], dtype=builder.dtype,
            query_start_loc=query_start_loc, causal=True, sliding_window_size=builder.window_size,
            isa=builder.isa, enable_kv_split=vllm_envs.VLLM_CPU_ATTN_SPLIT_KV)}

    return scheduler_metadata


def _with_fields(metadata, fields: dict, **more):
    """A shallow copy of `metadata` with `fields` and `more` set (a dataclass copy without
    re-running its constructor: 24 of these per step)."""
    derived = object.__new__(type(metadata))
    derived.__dict__.update(metadata.__dict__, **fields, **more)
    return derived


def _with_layer_kv(builder, metadata, block_table: torch.Tensor, slot_mapping: torch.Tensor):
    """A layer's metadata: its class's, with the layer's own block table and slot mapping."""
    if builder.supports_update_block_table:
        return builder.update_block_table(metadata, block_table, slot_mapping)
    if not (hasattr(metadata, "block_table") and hasattr(metadata, "slot_mapping")):
        raise NotImplementedError(f"p-MoD: unsupported attention metadata {type(metadata).__name__}")
    layer_metadata = copy.copy(metadata)
    layer_metadata.block_table = block_table
    layer_metadata.slot_mapping = slot_mapping
    return layer_metadata
