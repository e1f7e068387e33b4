"""Scheduler hooks for p-MoD: every request's visual tokens are prefilled in one step.

Top-k routing spans all target tokens of a request (across all its images), so a step may
start or stop before the first target or after the last one, never in between. The scheduler
also keeps each request's target ranges where the p-MoD KV-cache managers read them, admits a
waiting image request only when the KV pool can also finish the prompts already in progress, and
publishes the KV metrics.
"""

from __future__ import annotations

import itertools
import time

from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.request_queue import SchedulingPolicy
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request, RequestStatus

from pmod_serve import envs
from pmod_serve.pmod.kv_layout import RequestKVLayout
from pmod_serve.pmod.targets import RequestTargets, TargetPolicy
from pmod_serve.transformers_utils.vision_tower import image_layout_of
from pmod_serve.v1.core.kv_accounting import kv_usage, request_kv
from pmod_serve.v1.core.kv_cache_manager import PmodAttentionManager, PmodKVCacheManager
from pmod_serve.v1.metrics.prometheus import KVMetricsWriter

# Block-table gauges are recomputed at most this often (seconds), and whenever the engine idles.
USAGE_PUBLISH_INTERVAL = 0.05
# The statuses of a request the waiting queue admits (a new one, or one preempted back).
ADMISSIONS = (RequestStatus.WAITING, RequestStatus.PREEMPTED)


class PmodSchedulerMixin:
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        model_config = self.vllm_config.model_config
        layout = image_layout_of(model_config.hf_config, model_config.model)
        self.target_policy = TargetPolicy.from_config(model_config.hf_config, layout)
        self.request_targets: dict[str, RequestTargets] = {}
        managers = self.kv_cache_manager.coordinator.single_type_managers
        if len(managers) != 1 or not isinstance(managers[0], PmodAttentionManager):
            raise RuntimeError(
                "p-MoD: expected the KV cache as one PmodAttentionSpec group, got "
                f"{[type(m).__name__ for m in managers]}"
            )
        self.pmod_kv_manager: PmodAttentionManager = managers[0]
        # Prefix-cache lookups need the request's visual span: the p-MoD manager does them.
        if type(self.kv_cache_manager) is not KVCacheManager:
            raise RuntimeError(f"p-MoD: unexpected KV cache manager {type(self.kv_cache_manager).__name__}")
        self.kv_cache_manager.__class__ = PmodKVCacheManager
        self.kv_cache_manager.pmod_manager = self.pmod_kv_manager
        served_name = self.vllm_config.model_config.served_model_name
        self.pmod_metrics = KVMetricsWriter(
            model_name=served_name[0] if isinstance(served_name, list) else served_name,
            # The engine's index among data-parallel engines, as vLLM labels its own series:
            # for a dense model vLLM resets data_parallel_rank to 0 in every engine core
            # (its ranks are independent) and keeps the index in data_parallel_index.
            engine_index=self.vllm_config.parallel_config.data_parallel_index,
        )
        self.pmod_metrics.initialise()
        # Requests with images whose prefill has not been counted in the metrics yet.
        self._awaiting_prefill: dict[str, Request] = {}
        self._usage_published_at = 0.0
        self.coalesce_image_admissions = envs.PMOD_COALESCE_IMAGE_ADMISSIONS
        self.reserve_prompts_in_progress = envs.PMOD_RESERVE_PROMPTS_IN_PROGRESS
        self.image_admissions_held = False  # the last step held them (at most one step in a row)

    def add_request(self, request: Request) -> None:
        if request.request_id not in self.request_targets:
            targets = self.target_policy.targets_of(request.mm_features, request.num_prompt_tokens)
            start, end = targets.span
            if end - start > self.max_num_scheduled_tokens:
                raise ValueError(
                    f"request {request.request_id}: its visual tokens span {end - start} "
                    f"positions, more than one step can hold ({self.max_num_scheduled_tokens}); "
                    "raise --max-num-batched-tokens"
                )
            self.request_targets[request.request_id] = targets
            self.pmod_kv_manager.add_request_targets(request.request_id, targets)
            if any(f.modality == "image" for f in request.mm_features or ()):
                self._awaiting_prefill[request.request_id] = request
        super().add_request(request)

    def _try_schedule_encoder_inputs(
        self,
        request: Request,
        num_computed_tokens: int,
        num_new_tokens: int,
        encoder_compute_budget: int,
        shift_computed_tokens: int = 0,
    ):
        scheduled = super()._try_schedule_encoder_inputs(
            request, num_computed_tokens, num_new_tokens, encoder_compute_budget, shift_computed_tokens
        )
        encoder_inputs, scheduled_tokens, _, _ = scheduled
        targets = self.request_targets.get(request.request_id)
        if targets is None or not targets.ranges:
            return scheduled
        if (self.reserve_prompts_in_progress and request.status in ADMISSIONS
                and not self._fits_beside_prompts_in_progress(request, num_computed_tokens)):
            return [], 0, encoder_compute_budget, []  # no tokens: vLLM admits no more this step
        start, end = targets.span
        step_end = num_computed_tokens + scheduled_tokens
        if num_computed_tokens < end and start < step_end < end:
            # The step would end inside the visual span: stop before it instead and leave the
            # images for a later step, which then takes the whole span.
            return [], max(0, start - num_computed_tokens), encoder_compute_budget, []
        return scheduled

    def _fits_beside_prompts_in_progress(self, request: Request, num_computed_tokens: int) -> bool:
        """Whether the free pool holds this waiting image request's whole prompt once the prompts
        already in progress have what they still need (PMOD_RESERVE_PROMPTS_IN_PROGRESS).

        vLLM's admission gate (`scheduler_reserve_full_isl`) checks a new request's whole prompt
        against the free pool alone. When a step can take no more images (its encoder budget),
        it admits the waiting image requests with only their pre-image tokens, each counting the
        same free blocks, and later steps preempt them back: at concurrency 256 on an H200, 122
        preemptions over 256 requests, 810 over 1,024 (7 over 256 with this gate, at the same
        requests/s). The blocks still needed are counted from the blocks each request holds, so
        whatever this step already gave a running request is counted once."""
        needed = self._blocks_to_finish_prompt(request, num_computed_tokens)
        held_of = self.pmod_kv_manager.req_to_blocks
        reserved = 0
        for other in self.running:
            # Prompts in progress, including those admitted earlier in this step (vLLM sets
            # `is_prefill_chunk` once the step is scheduled).
            in_progress = other.is_prefill_chunk or other.num_computed_tokens < other.num_prompt_tokens
            if in_progress and other is not request:
                held = len(held_of.get(other.request_id, ()))
                reserved += max(0, self._blocks_for_whole_prompt(other) - held)
        return needed + reserved <= self._admissible_free_blocks()

    def _free_blocks(self, request: Request) -> None:
        self._count_prefill(request)
        held = request_kv(self, request)
        if held is not None:
            self.pmod_metrics.observe_request(held.savings_ratio)
        super()._free_blocks(request)
        # Kept across preemption (blocks are freed and re-allocated), dropped once finished.
        self.request_targets.pop(request.request_id, None)
        self.pmod_kv_manager.drop_request(request.request_id)
        self._awaiting_prefill.pop(request.request_id, None)
        if not self.requests:
            self._publish_usage(force=True)  # an idle engine may not schedule again soon

    # --- scheduling: the step's admissions (and the metrics after it) ----------------------

    def schedule(self, throttle_prefills: bool = False):
        hold = not throttle_prefills and self.coalesce_image_admissions and self._hold_image_admissions()
        if hold:
            # vLLM's prefill throttle (built for data-parallel balancing) runs the step's decodes
            # and defers every prefill. It stands down when the waiting queue is saturated,
            # which is exactly the case here, hence its flag is lifted for this one step.
            capacity_bound = self.prefill_capacity_bound
            self.prefill_capacity_bound = False
            try:
                output = super().schedule(throttle_prefills=True)
            finally:
                self.prefill_capacity_bound = capacity_bound
        else:
            output = super().schedule(throttle_prefills=throttle_prefills)
        self.image_admissions_held = hold
        self._publish_usage()
        return output

    def _hold_image_admissions(self) -> bool:
        """Whether this step should admit no new image request (PMOD_COALESCE_IMAGE_ADMISSIONS).

        Under load the KV cache is full and frees about one request's blocks per step, so each
        routed step would prefill one image; its host cost (the routed decoder's launches, the
        vision tower's) is nearly the same for two. So when the pool has room for the first
        waiting image request but not for the second, and one step could prefill both, the step
        runs the decodes alone and the next one admits the two. Never two steps in a row, so no
        request waits more than one step longer."""
        if self.image_admissions_held or self.policy != SchedulingPolicy.FCFS or self.skipped_waiting:
            return False
        if not any(not request.is_prefill_chunk for request in self.running):
            return False  # nothing to decode: holding would only idle the GPU
        # The next two image prefills, in the order the scheduler takes them: running requests
        # admitted with only their pre-image tokens, then the waiting queue.
        pending = (request for request in itertools.chain(self.running, self.waiting)
                   if request.mm_features and request.num_computed_tokens < self._visual_end(request))
        first, second = (list(itertools.islice(pending, 2)) + [None, None])[:2]
        if second is None:
            return False
        both_tokens = (first.num_tokens - first.num_computed_tokens) + (second.num_tokens - second.num_computed_tokens)
        both_images = sum(request.get_num_encoder_embeds(index)
                          for request in (first, second) for index in range(len(request.mm_features)))
        if (both_tokens + len(self.running) > self.max_num_scheduled_tokens
                or both_images > self.max_num_encoder_input_tokens):
            return False  # one step could not prefill both anyway
        free = self._admissible_free_blocks()
        first_blocks, second_blocks = (self._blocks_to_finish_prompt(request) for request in (first, second))
        return first_blocks <= free < first_blocks + second_blocks

    def _visual_end(self, request: Request) -> int:
        targets = self.request_targets.get(request.request_id)
        return targets.span[1] if targets is not None else 0

    def _blocks_to_finish_prompt(self, request: Request, num_computed_tokens: int | None = None) -> int:
        """Blocks of all layers the request still needs for its whole prompt, from
        `num_computed_tokens` (default: the request's; a waiting request's prefix-cache hit is
        deducted only when the caller passes it)."""
        if num_computed_tokens is None:
            num_computed_tokens = request.num_computed_tokens
        computed = self._layout(request).total_blocks(num_computed_tokens)
        return self._blocks_for_whole_prompt(request) - computed

    def _blocks_for_whole_prompt(self, request: Request) -> int:
        """Blocks of all layers that hold the request's tokens so far (its prompt, and what it
        generated before a preemption), as vLLM's admission gate counts a whole sequence."""
        return self._layout(request).total_blocks(min(request.num_tokens, self.max_model_len))

    def _admissible_free_blocks(self) -> int:
        """Free blocks a waiting request may take: vLLM keeps its watermark free of admissions."""
        return self.kv_cache_manager.block_pool.get_num_free_blocks() - self.kv_cache_manager.watermark_blocks

    def _layout(self, request: Request) -> RequestKVLayout:
        return self.pmod_kv_manager.layouts[request.request_id]

    # --- metrics: what the block tables hold -------------------------------------------------

    def update_from_output(self, *args, **kwargs):
        outputs = super().update_from_output(*args, **kwargs)
        for request in list(self._awaiting_prefill.values()):
            self._count_prefill(request)
        self._publish_usage(force=not self.requests)
        return outputs

    def _count_prefill(self, request: Request) -> None:
        """Once per request, when its visual tokens have been prefilled."""
        targets = self.request_targets.get(request.request_id)
        if targets is None or request.request_id not in self._awaiting_prefill:
            return
        if request.num_computed_tokens < max(targets.span[1], 1) or not request.mm_features:
            return
        del self._awaiting_prefill[request.request_id]
        if self.pmod_kv_manager.prefix_hits.get(request.request_id, 0) >= targets.span[1]:
            return  # its images came from the prefix cache: nothing prefilled, no slot taken
        visual_tokens = sum(f.mm_position.length for f in request.mm_features if f.modality == "image")
        slots_saved = self.pmod_kv_manager.layouts[request.request_id].total_skipped
        self.pmod_metrics.add_prefill(visual_tokens, slots_saved)

    def _publish_usage(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._usage_published_at < USAGE_PUBLISH_INTERVAL:
            return
        self._usage_published_at = now
        usage = kv_usage(self)
        self.pmod_metrics.set_usage(usage.layer_blocks, usage.dense_layer_blocks)


class PmodScheduler(PmodSchedulerMixin, Scheduler):
    pass


class PmodAsyncScheduler(PmodSchedulerMixin, AsyncScheduler):
    pass


def make_pmod_scheduler(*args, **kwargs):
    """`scheduler_cls` entry point: the p-MoD scheduler on vLLM's async or sync base.

    The engine decides `async_scheduling` after the config hook runs, so the choice is made here,
    when the engine core builds its scheduler.
    """
    async_scheduling = kwargs["vllm_config"].scheduler_config.async_scheduling
    return (PmodAsyncScheduler if async_scheduling else PmodScheduler)(*args, **kwargs)
