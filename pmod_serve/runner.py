"""Model-runner hooks: a compacted index space per p-MoD KV cache group.

In a p-MoD layer, a request's kept tokens (its text and the layer's top-k visual tokens, in
position order) are numbered 0, 1, 2, ...; kept token `c` is cached at slot
`block_table[c // block_size] * block_size + c % block_size` of that layer's group. The counts
are known before the forward pass, so each step the runner builds, per retention ratio, the
compacted `query_start_loc`, `seq_lens` and slot mapping, and hands the model the batch
positions of the target tokens it has to route. RoPE uses the original positions (applied to
q/k before caching), so attention over the compacted sequence is attention over the kept
tokens, and every attention backend runs unchanged.

Four small overrides of vLLM's V1 `GPUModelRunner` (shared by `CPUModelRunner`):
`get_kv_cache_spec`, `_prepare_inputs`, `_get_slot_mappings`, `_build_attention_metadata`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheSpec

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


@dataclass
class CompactedGroup:
    """Compacted attention inputs of the KV cache groups that share one retention ratio."""

    query_start_loc_cpu: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens_cpu: torch.Tensor
    seq_lens: torch.Tensor
    num_computed_cpu: torch.Tensor
    positions: torch.Tensor
    num_tokens: int
    max_query_len: int
    max_seq_len: int


@dataclass
class PmodStep:
    """What one scheduled step looks like in every compacted group."""

    by_ratio: dict[float, CompactedGroup]
    num_reqs: int


class PmodRunnerMixin:
    """Mixed into vLLM's V1 GPU or CPU model runner for p-MoD models."""

    _pmod_step: PmodStep | None = None

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

    def _pmod_group_ratios(self) -> dict[int, float]:
        """KV cache group id -> retention ratio, for the p-MoD groups."""
        ratios = {}
        for gid, group in enumerate(self.kv_cache_config.kv_cache_groups):
            ratio = getattr(group.kv_cache_spec, "retention_ratio", None)
            if ratio is not None:
                ratios[gid] = ratio
        return ratios

    # --- per step -----------------------------------------------------------------------

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens: np.ndarray):
        result = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        self._pmod_step = None
        group_ratios = self._pmod_group_ratios()
        num_reqs = self.input_batch.num_reqs
        policy = TargetPolicy.from_config(self.model_config.hf_config)
        num_computed = self.input_batch.num_computed_tokens_cpu[:num_reqs].astype(np.int64)
        num_sched = num_scheduled_tokens.astype(np.int64)
        targets: list[RequestTargets] = []
        for req_id in self.input_batch.req_ids[:num_reqs]:
            state = self.requests[req_id]
            targets.append(policy.targets_of(state.mm_features, state.num_prompt_tokens))

        routing = self._routing_for_step(targets, num_computed, num_sched)
        if group_ratios and any(t.ranges for t in targets):
            by_ratio = {
                ratio: self._compact_group(targets, ratio, num_computed, num_sched)
                for ratio in sorted(set(group_ratios.values()))
            }
            self._pmod_step = PmodStep(by_ratio=by_ratio, num_reqs=num_reqs)
            for gid, ratio in group_ratios.items():
                compacted = by_ratio[ratio]
                self.input_batch.block_table[gid].compute_slot_mapping(
                    num_reqs, compacted.query_start_loc, compacted.positions
                )
        self._pmod_model().set_pmod_routing(routing)
        return result

    def _routing_for_step(
        self, targets: list[RequestTargets], num_computed: np.ndarray, num_sched: np.ndarray
    ) -> PmodRouting | None:
        """Batch indices of the target tokens prefilled in this step (all or none of a request's)."""
        pieces, segments, offset = [], [], 0
        batch_start = 0
        for i, request_targets in enumerate(targets):
            step_start, step_end = int(num_computed[i]), int(num_computed[i] + num_sched[i])
            span_start, span_end = request_targets.span
            if request_targets.ranges and step_start <= span_start and span_end <= step_end:
                indices = np.concatenate(
                    [np.arange(start, end) for start, end in request_targets.ranges]
                ) - step_start + batch_start
                pieces.append(indices)
                segments.append((offset, offset + len(indices)))
                offset += len(indices)
            batch_start += int(num_sched[i])
        if not pieces:
            return None
        target_index = torch.from_numpy(np.concatenate(pieces)).to(self.device, non_blocking=True)
        return PmodRouting(target_index=target_index, segments=segments)

    def _compact_group(
        self, targets: list[RequestTargets], ratio: float, num_computed: np.ndarray, num_sched: np.ndarray
    ) -> CompactedGroup:
        start = np.array([t.compacted_length(int(n), ratio) for t, n in zip(targets, num_computed)])
        end = np.array(
            [t.compacted_length(int(n + s), ratio) for t, n, s in zip(targets, num_computed, num_sched)]
        )
        query_lens = end - start
        query_start_loc = np.zeros(len(targets) + 1, dtype=np.int32)
        np.cumsum(query_lens, out=query_start_loc[1:])
        num_tokens = int(query_start_loc[-1])
        # Compacted index of every kept token: request r's tokens are start[r], start[r]+1, ...
        positions = np.repeat(start - query_start_loc[:-1], query_lens) + np.arange(num_tokens)
        query_start_loc_cpu = torch.from_numpy(query_start_loc)
        seq_lens_cpu = torch.from_numpy(end.astype(np.int32))
        return CompactedGroup(
            query_start_loc_cpu=query_start_loc_cpu,
            query_start_loc=query_start_loc_cpu.to(self.device, non_blocking=True),
            seq_lens_cpu=seq_lens_cpu,
            seq_lens=seq_lens_cpu.to(self.device, non_blocking=True),
            num_computed_cpu=torch.from_numpy(start.astype(np.int32)),
            positions=torch.from_numpy(positions.astype(np.int64)).to(self.device, non_blocking=True),
            num_tokens=num_tokens,
            max_query_len=int(query_lens.max(initial=0)),
            max_seq_len=int(end.max(initial=0)),
        )

    def _get_slot_mappings(self, num_tokens_padded, num_reqs_padded, num_tokens_unpadded, ubatch_slices=None):
        by_group, by_layer = super()._get_slot_mappings(
            num_tokens_padded, num_reqs_padded, num_tokens_unpadded, ubatch_slices
        )
        step = self._pmod_step
        if step is None or by_group is None:
            return by_group, by_layer
        if ubatch_slices is not None or num_tokens_padded != num_tokens_unpadded:
            raise NotImplementedError("p-MoD: padded or micro-batched steps are not supported")
        for gid, ratio in self._pmod_group_ratios().items():
            compacted = self.input_batch.block_table[gid].slot_mapping.gpu[: step.by_ratio[ratio].num_tokens]
            by_group[gid] = compacted
            for layer_name in self.kv_cache_config.kv_cache_groups[gid].layer_names:
                by_layer[layer_name] = compacted
        return by_group, by_layer

    def _build_attention_metadata(self, *args, **kwargs):
        attn_metadata, spec_decode_metadata = super()._build_attention_metadata(*args, **kwargs)
        step = self._pmod_step
        if step is None or kwargs.get("for_cudagraph_capture"):
            return attn_metadata, spec_decode_metadata
        slot_mappings = kwargs["slot_mappings"]
        num_reqs = step.num_reqs
        is_prefilling = (
            self.input_batch.num_computed_tokens_cpu_tensor[:num_reqs]
            < self.input_batch.num_prompt_tokens_cpu_tensor[:num_reqs]
        )
        for gid, ratio in self._pmod_group_ratios().items():
            compacted = step.by_ratio[ratio]
            common = CommonAttentionMetadata(
                query_start_loc=compacted.query_start_loc,
                query_start_loc_cpu=compacted.query_start_loc_cpu,
                seq_lens=compacted.seq_lens,
                _seq_lens_cpu=compacted.seq_lens_cpu,
                _num_computed_tokens_cpu=compacted.num_computed_cpu,
                seq_lens_cpu_upper_bound=compacted.seq_lens_cpu,
                num_reqs=num_reqs,
                num_actual_tokens=compacted.num_tokens,
                max_query_len=compacted.max_query_len,
                max_seq_len=compacted.max_seq_len,
                block_table_tensor=self.input_batch.block_table[gid].get_device_tensor(num_reqs),
                slot_mapping=slot_mappings[gid],
                causal=True,
                is_prefilling=is_prefilling,
                positions=compacted.positions,
            )
            for attn_group in self.attn_groups[gid]:
                metadata = attn_group.get_metadata_builder().build(
                    common_prefix_len=0, common_attn_metadata=common
                )
                for layer_name in attn_group.layer_names:
                    attn_metadata[layer_name] = metadata
        return attn_metadata, spec_decode_metadata

    def _dummy_run(self, *args, **kwargs):
        # Profiling and warm-up batches carry no images: nothing to route or compact.
        self._pmod_step = None
        self._pmod_model().set_pmod_routing(None)
        return super()._dummy_run(*args, **kwargs)

    def _pmod_model(self):
        model = self.get_model()
        return model.unwrap() if hasattr(model, "unwrap") else model
