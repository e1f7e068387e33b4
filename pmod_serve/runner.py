"""Model-runner hooks: a compacted index space per p-MoD KV cache group.

In a p-MoD layer, a request's kept tokens (its text and the layer's top-k visual tokens, in
position order) are numbered 0, 1, 2, ...; kept token `c` is cached at slot
`block_table[c // block_size] * block_size + c % block_size` of that layer's group. The counts
are known before the forward pass, so each step the runner builds, per retention ratio, the
compacted `query_start_loc`, `seq_lens` and slot mapping, and hands the model the batch
positions of the target tokens it has to route. RoPE uses the original positions (applied to
q/k before caching), so attention over the compacted sequence is attention over the kept
tokens, and every attention backend runs unchanged.

Overrides of vLLM's V1 `GPUModelRunner` (shared by `CPUModelRunner`): `get_kv_cache_spec`,
`_prepare_inputs`, `_get_slot_mappings`, `_build_attention_metadata`,
`_determine_batch_execution_and_padding` and `_dummy_run`.

CUDA graphs. Decode steps can replay full CUDA graphs (`cudagraph_mode=FULL_DECODE_ONLY`, set by
`pmod_serve.engine_config` on GPUs). A graph bakes in the addresses of the tensors its attention
kernels read, so every retention ratio owns persistent device buffers (`query_start_loc`,
`seq_lens`, compacted positions): graphs are captured reading them, and every step writes its
compacted values into them (or, in a step without images, the uncompacted values: compacted and
full lengths are then equal). Steps that route visual tokens (prefill) always run eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheSpec
from vllm.v1.utils import CpuGpuBuffer

from pmod_serve.config import PmodSchedule
from pmod_serve.kv_layout import RequestTargets, TargetPolicy
from pmod_serve.kv_manager import PmodAttentionSpec, register_kv_cache_spec


@dataclass
class PmodRouting:
    """The target tokens of one step, for the model's p-MoD layers.

    `target_index` holds batch indices of target tokens, request after request, in position
    order; `segments[i]` is the `[start, end)` slice of `target_index` of the i-th routed
    request (top-k is taken per request).
    """

    target_index: torch.Tensor
    segments: list[tuple[int, int]]


class RatioBuffers:
    """Persistent compacted attention inputs of one retention ratio (CUDA-graph safe)."""

    def __init__(self, max_num_reqs: int, max_num_tokens: int, device: torch.device) -> None:
        self.query_start_loc = CpuGpuBuffer(max_num_reqs + 1, dtype=torch.int32, device=device)
        self.seq_lens = CpuGpuBuffer(max_num_reqs, dtype=torch.int32, device=device)
        self.positions = CpuGpuBuffer(max_num_tokens, dtype=torch.int64, device=device)
        self.num_computed = torch.zeros(max_num_reqs, dtype=torch.int32)
        if device.type == "cpu":
            # As vLLM's CPU runner does with its own buffers: one tensor serves both sides.
            for buffer in (self.query_start_loc, self.seq_lens, self.positions):
                buffer.gpu = buffer.cpu


@dataclass
class CompactedGroup:
    """This step's compacted attention inputs of the KV cache groups sharing one ratio."""

    buffers: RatioBuffers
    num_reqs: int
    num_tokens: int
    max_query_len: int
    max_seq_len: int


@dataclass
class PmodStep:
    """What one scheduled step looks like in every compacted group (by ratio index)."""

    groups: list[CompactedGroup]
    num_reqs: int


@dataclass
class RequestPlan:
    """A request's targets and, per retention ratio, how many of them a layer skips."""

    targets: RequestTargets
    span_start: int
    span_end: int
    skipped: np.ndarray  # [num_ratios] int64


@dataclass
class PmodLayout:
    """The p-MoD KV cache groups of one KV cache config."""

    ratios: list[float]  # distinct retention ratios, sorted
    group_ratio: dict[int, int]  # KV cache group id -> index into `ratios`
    buffers: list[RatioBuffers]  # per ratio index


class PmodRunnerMixin:
    """Mixed into vLLM's V1 GPU or CPU model runner for p-MoD models."""

    _pmod_step: PmodStep | None = None
    _pmod_routing: PmodRouting | None = None
    _pmod_layout_cache: tuple[int, PmodLayout] | None = None
    _pmod_plans: dict[str, RequestPlan] | None = None
    _pmod_policy: TargetPolicy | None = None

    # --- KV cache layout ----------------------------------------------------------------

    def get_kv_cache_spec(self) -> dict[str, KVCacheSpec]:
        register_kv_cache_spec()
        schedule = PmodSchedule.from_config(self.model_config.hf_config)
        specs = super().get_kv_cache_spec()
        for layer_name, spec in specs.items():
            if type(spec) is not FullAttentionSpec:
                raise ValueError(f"p-MoD: unexpected KV cache spec {type(spec).__name__} for {layer_name}")
            ratio = schedule.retention_ratio.get(extract_layer_index(layer_name))
            fields = {name: getattr(spec, name) for name in spec.__dataclass_fields__}
            specs[layer_name] = PmodAttentionSpec(**fields, retention_ratio=ratio)
        return specs

    def _pmod_layout(self) -> PmodLayout | None:
        """The p-MoD groups of the current KV cache config (None before one exists)."""
        kv_cache_config = getattr(self, "kv_cache_config", None)
        if kv_cache_config is None:
            return None
        cached = self._pmod_layout_cache
        if cached is not None and cached[0] == id(kv_cache_config):
            return cached[1]
        group_ratio_value = {}
        for gid, group in enumerate(kv_cache_config.kv_cache_groups):
            ratio = getattr(group.kv_cache_spec, "retention_ratio", None)
            if ratio is not None:
                group_ratio_value[gid] = ratio
        ratios = sorted(set(group_ratio_value.values()))
        index = {ratio: i for i, ratio in enumerate(ratios)}
        device = torch.device(self.device)
        layout = PmodLayout(
            ratios=ratios,
            group_ratio={gid: index[ratio] for gid, ratio in group_ratio_value.items()},
            buffers=[RatioBuffers(self.max_num_reqs, self.max_num_tokens, device) for _ in ratios],
        )
        self._pmod_layout_cache = (id(kv_cache_config), layout)
        # Plans hold per-ratio counts: a new layout invalidates them.
        self._pmod_plans = {}
        return layout

    def _pmod_group_ratios(self) -> dict[int, float]:
        """KV cache group id -> retention ratio, for the p-MoD groups."""
        layout = self._pmod_layout()
        if layout is None:
            return {}
        return {gid: layout.ratios[i] for gid, i in layout.group_ratio.items()}

    def _pmod_plan(self, req_id: str, layout: PmodLayout) -> RequestPlan:
        plans = self._pmod_plans
        if plans is None:
            plans = self._pmod_plans = {}
        plan = plans.get(req_id)
        if plan is None:
            if self._pmod_policy is None:
                self._pmod_policy = TargetPolicy.from_config(self.model_config.hf_config)
            state = self.requests[req_id]
            targets = self._pmod_policy.targets_of(state.mm_features, state.num_prompt_tokens)
            span_start, span_end = targets.span
            skipped = np.array([targets.num_skipped(ratio) for ratio in layout.ratios], dtype=np.int64)
            plan = RequestPlan(targets, span_start, span_end, skipped)
            if len(plans) > 4 * max(self.max_num_reqs, 64):
                # Drop finished requests now and then.
                for old in [r for r in plans if r not in self.requests]:
                    del plans[old]
            plans[req_id] = plan
        return plan

    # --- per step -----------------------------------------------------------------------

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens: np.ndarray):
        result = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        self._pmod_step = None
        self._pmod_routing = None
        layout = self._pmod_layout()
        num_reqs = self.input_batch.num_reqs
        if layout is None or not layout.ratios:
            self._pmod_model().set_pmod_routing(None)
            return result
        plans = [self._pmod_plan(req_id, layout) for req_id in self.input_batch.req_ids[:num_reqs]]
        num_computed = self.input_batch.num_computed_tokens_cpu[:num_reqs].astype(np.int64)
        num_sched = num_scheduled_tokens[:num_reqs].astype(np.int64)

        routing = self._routing_for_step(plans, num_computed, num_sched)
        if any(plan.targets.ranges for plan in plans):
            span_start = np.fromiter((p.span_start for p in plans), dtype=np.int64, count=num_reqs)
            span_end = np.fromiter((p.span_end for p in plans), dtype=np.int64, count=num_reqs)
            skipped = np.stack([p.skipped for p in plans])  # [num_reqs, num_ratios]
            groups = [
                self._compact_group(layout.buffers[k], span_start, span_end, skipped[:, k], num_computed, num_sched)
                for k in range(len(layout.ratios))
            ]
            self._pmod_step = PmodStep(groups=groups, num_reqs=num_reqs)
            for gid, k in layout.group_ratio.items():
                compacted = groups[k]
                self.input_batch.block_table[gid].compute_slot_mapping(
                    num_reqs,
                    compacted.buffers.query_start_loc.gpu[: num_reqs + 1],
                    compacted.buffers.positions.gpu[: compacted.num_tokens],
                )
        self._pmod_routing = routing
        self._pmod_model().set_pmod_routing(routing)
        return result

    def _routing_for_step(
        self, plans: list[RequestPlan], num_computed: np.ndarray, num_sched: np.ndarray
    ) -> PmodRouting | None:
        """Batch indices of the target tokens prefilled in this step (all or none of a request's)."""
        pieces, segments, offset = [], [], 0
        batch_start = 0
        for i, plan in enumerate(plans):
            step_start, step_end = int(num_computed[i]), int(num_computed[i] + num_sched[i])
            ranges = plan.targets.ranges
            if ranges and step_start <= plan.span_start and plan.span_end <= step_end:
                indices = np.concatenate([np.arange(start, end) for start, end in ranges]) - step_start + batch_start
                pieces.append(indices)
                segments.append((offset, offset + len(indices)))
                offset += len(indices)
            batch_start += int(num_sched[i])
        if not pieces:
            return None
        target_index = torch.from_numpy(np.concatenate(pieces)).to(self.device, non_blocking=True)
        return PmodRouting(target_index=target_index, segments=segments)

    @staticmethod
    def _compacted_lengths(
        num_tokens: np.ndarray, span_start: np.ndarray, span_end: np.ndarray, skipped: np.ndarray
    ) -> np.ndarray:
        """`RequestTargets.compacted_length` for every request of the batch at once."""
        inside = (skipped > 0) & (num_tokens > span_start) & (num_tokens < span_end)
        if inside.any():
            i = int(np.argmax(inside))
            raise ValueError(
                f"p-MoD: {int(num_tokens[i])} tokens end inside the visual span "
                f"[{int(span_start[i])}, {int(span_end[i])}); a request's visual tokens must be "
                "prefilled in one step"
            )
        return np.where(num_tokens >= span_end, num_tokens - skipped, num_tokens)

    def _compact_group(
        self,
        buffers: RatioBuffers,
        span_start: np.ndarray,
        span_end: np.ndarray,
        skipped: np.ndarray,
        num_computed: np.ndarray,
        num_sched: np.ndarray,
    ) -> CompactedGroup:
        num_reqs = len(num_computed)
        start = self._compacted_lengths(num_computed, span_start, span_end, skipped)
        end = self._compacted_lengths(num_computed + num_sched, span_start, span_end, skipped)
        query_lens = end - start
        query_start_loc = buffers.query_start_loc.np
        query_start_loc[0] = 0
        np.cumsum(query_lens, out=query_start_loc[1 : num_reqs + 1])
        num_tokens = int(query_start_loc[num_reqs])
        # Padded requests (CUDA graphs) hold no tokens: keep query_start_loc non-decreasing.
        query_start_loc[num_reqs + 1 :] = num_tokens
        seq_lens = buffers.seq_lens.np
        seq_lens[:num_reqs] = end
        seq_lens[num_reqs:] = 0
        buffers.num_computed[:num_reqs] = torch.from_numpy(start.astype(np.int32))
        buffers.num_computed[num_reqs:] = 0
        # Compacted index of every kept token: request r's tokens are start[r], start[r]+1, ...
        buffers.positions.np[:num_tokens] = (
            np.repeat(start - query_start_loc[:num_reqs], query_lens) + np.arange(num_tokens)
        )
        buffers.query_start_loc.copy_to_gpu()
        buffers.seq_lens.copy_to_gpu()
        buffers.positions.copy_to_gpu(num_tokens)
        return CompactedGroup(
            buffers=buffers,
            num_reqs=num_reqs,
            num_tokens=num_tokens,
            max_query_len=int(query_lens.max(initial=0)),
            max_seq_len=int(end.max(initial=0)),
        )

    def _determine_batch_execution_and_padding(self, *args, **kwargs):
        # Routing (top-k, gathers of a data-dependent size) never runs inside a CUDA graph.
        if self._pmod_routing is not None:
            kwargs["force_eager"] = True
        return super()._determine_batch_execution_and_padding(*args, **kwargs)

    def _get_slot_mappings(self, num_tokens_padded, num_reqs_padded, num_tokens_unpadded, ubatch_slices=None):
        by_group, by_layer = super()._get_slot_mappings(
            num_tokens_padded, num_reqs_padded, num_tokens_unpadded, ubatch_slices
        )
        step = self._pmod_step
        if step is None or by_group is None:
            return by_group, by_layer
        if ubatch_slices is not None:
            raise NotImplementedError("p-MoD: micro-batched steps are not supported")
        layout = self._pmod_layout()
        padding = num_tokens_padded - num_tokens_unpadded
        for gid, k in layout.group_ratio.items():
            # compute_slot_mapping padded everything past the compacted tokens with -1.
            compacted = self.input_batch.block_table[gid].slot_mapping.gpu[: step.groups[k].num_tokens + padding]
            by_group[gid] = compacted
            for layer_name in self.kv_cache_config.kv_cache_groups[gid].layer_names:
                by_layer[layer_name] = compacted
        return by_group, by_layer

    def _build_attention_metadata(self, *args, **kwargs):
        layout = self._pmod_layout()
        if layout is None or not layout.group_ratio or kwargs.get("ubatch_slices") is not None:
            return super()._build_attention_metadata(*args, **kwargs)
        if args:
            raise TypeError("p-MoD: _build_attention_metadata expects keyword arguments (vLLM 0.26)")
        # Every group is built below, each by its own metadata builder: the p-MoD groups from their
        # own (compacted, persistent) inputs, the ordinary ones from vLLM's. vLLM's shortcut for
        # groups of one spec (`update_block_table`: one build shared by all of them) is wrong under
        # full CUDA graphs with FlashAttention 3: each group's graph was captured reading its own
        # builder's scheduler-metadata buffer, which the shortcut never refreshes. So the base
        # class sees no attention groups (it still pads the block tables for CUDA graphs).
        saved_groups = self.attn_groups
        self.attn_groups = [[] for _ in saved_groups]
        try:
            attn_metadata, spec_decode_metadata = super()._build_attention_metadata(*args, **kwargs)
        finally:
            self.attn_groups = saved_groups
        if not isinstance(attn_metadata, dict):
            raise NotImplementedError("p-MoD: micro-batched steps are not supported")
        self._build_pmod_attention_metadata(layout, attn_metadata, **kwargs)
        return attn_metadata, spec_decode_metadata

    def _build_pmod_attention_metadata(
        self,
        layout: PmodLayout,
        attn_metadata: dict,
        *,
        num_tokens: int,
        num_reqs: int,
        max_query_len: int,
        num_tokens_padded: int | None = None,
        num_reqs_padded: int | None = None,
        for_cudagraph_capture: bool = False,
        slot_mappings: dict[int, torch.Tensor] | None = None,
        **_: object,
    ) -> None:
        # `num_tokens_padded` is given exactly when the step replays (or captures) a full CUDA graph.
        graph_step = num_tokens_padded is not None
        num_tokens_padded = num_tokens_padded or num_tokens
        num_reqs_padded = num_reqs_padded or num_reqs
        padding = num_tokens_padded - num_tokens
        step = self._pmod_step
        assert slot_mappings is not None

        num_computed_all = self.input_batch.num_computed_tokens_cpu_tensor[:num_reqs_padded]
        is_prefilling = num_computed_all < self.input_batch.num_prompt_tokens_cpu_tensor[:num_reqs_padded]
        is_prefilling[num_reqs:] = False
        if for_cudagraph_capture:
            max_seq_len_full = self.max_model_len
        else:
            max_seq_len_full = int(self.optimistic_seq_lens_cpu.numpy()[:num_reqs].max())

        common_by_ratio: list[CommonAttentionMetadata] = []
        for k, buffers in enumerate(layout.buffers):
            if step is not None:
                # This step's compacted lengths (already copied into the ratio's buffers).
                compacted = step.groups[k]
                query_start_loc = buffers.query_start_loc
                seq_lens = buffers.seq_lens
                common = dict(
                    query_start_loc=query_start_loc.gpu[: num_reqs_padded + 1],
                    query_start_loc_cpu=query_start_loc.cpu[: num_reqs_padded + 1],
                    seq_lens=seq_lens.gpu[:num_reqs_padded],
                    _seq_lens_cpu=seq_lens.cpu[:num_reqs_padded],
                    _num_computed_tokens_cpu=buffers.num_computed[:num_reqs_padded],
                    seq_lens_cpu_upper_bound=seq_lens.cpu[:num_reqs_padded],
                    num_actual_tokens=compacted.num_tokens + padding,
                    max_query_len=compacted.max_query_len,
                    max_seq_len=self.max_model_len if for_cudagraph_capture else compacted.max_seq_len,
                    positions=buffers.positions.gpu[: compacted.num_tokens + padding],
                )
            else:
                # No image in this step: compacted and full lengths agree. A graph step still
                # reads the ratio's own buffers, so copy the full values there.
                if graph_step:
                    buffers.query_start_loc.gpu[: num_reqs_padded + 1].copy_(
                        self.query_start_loc.gpu[: num_reqs_padded + 1], non_blocking=True
                    )
                    buffers.seq_lens.gpu[:num_reqs_padded].copy_(self.seq_lens[:num_reqs_padded], non_blocking=True)
                    query_start_loc_gpu = buffers.query_start_loc.gpu[: num_reqs_padded + 1]
                    seq_lens_gpu = buffers.seq_lens.gpu[:num_reqs_padded]
                else:
                    query_start_loc_gpu = self.query_start_loc.gpu[: num_reqs_padded + 1]
                    seq_lens_gpu = self.seq_lens[:num_reqs_padded]
                seq_lens_cpu = self.optimistic_seq_lens_cpu[:num_reqs_padded]
                common = dict(
                    query_start_loc=query_start_loc_gpu,
                    query_start_loc_cpu=self.query_start_loc.cpu[: num_reqs_padded + 1],
                    seq_lens=seq_lens_gpu,
                    _seq_lens_cpu=seq_lens_cpu,
                    _num_computed_tokens_cpu=num_computed_all,
                    seq_lens_cpu_upper_bound=seq_lens_cpu,
                    num_actual_tokens=num_tokens_padded,
                    max_query_len=max_query_len,
                    max_seq_len=max_seq_len_full,
                    positions=self.positions[:num_tokens_padded],
                )
            common_by_ratio.append(common)

        # Ordinary layers: vLLM's own (persistent) inputs, as vLLM would build them.
        seq_lens_cpu_full = self.optimistic_seq_lens_cpu[:num_reqs_padded]
        common_full = dict(
            query_start_loc=self.query_start_loc.gpu[: num_reqs_padded + 1],
            query_start_loc_cpu=self.query_start_loc.cpu[: num_reqs_padded + 1],
            seq_lens=self.seq_lens[:num_reqs_padded],
            _seq_lens_cpu=seq_lens_cpu_full,
            _num_computed_tokens_cpu=num_computed_all,
            seq_lens_cpu_upper_bound=seq_lens_cpu_full,
            num_actual_tokens=num_tokens_padded,
            max_query_len=max_query_len,
            max_seq_len=max_seq_len_full,
            positions=self.positions[:num_tokens_padded],
        )

        for gid in range(len(self.kv_cache_config.kv_cache_groups)):
            k = layout.group_ratio.get(gid)
            common = CommonAttentionMetadata(
                **(common_full if k is None else common_by_ratio[k]),
                num_reqs=num_reqs_padded,
                # The base class filled the padded rows with the null block.
                block_table_tensor=self.input_batch.block_table[gid].get_device_tensor(num_reqs_padded),
                slot_mapping=slot_mappings[gid],
                causal=True,
                is_prefilling=is_prefilling,
            )
            for attn_group in self.attn_groups[gid]:
                builder = attn_group.get_metadata_builder()
                if for_cudagraph_capture:
                    metadata = builder.build_for_cudagraph_capture(common)
                else:
                    metadata = builder.build(common_prefix_len=0, common_attn_metadata=common)
                for layer_name in attn_group.layer_names:
                    attn_metadata[layer_name] = metadata

    def _dummy_run(self, *args, **kwargs):
        # Profiling, warm-up and capture batches carry no images: nothing to route or compact.
        self._pmod_step = None
        self._pmod_routing = None
        self._pmod_model().set_pmod_routing(None)
        return super()._dummy_run(*args, **kwargs)

    def _pmod_model(self):
        model = self.get_model()
        return model.unwrap() if hasattr(model, "unwrap") else model
