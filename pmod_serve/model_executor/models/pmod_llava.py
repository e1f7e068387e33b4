"""p-MoD-LLaVA for vLLM (arXiv 2412.04449; the computation of docs/p-mod.md).

LLaVA with a LLaMA decoder whose deeper layers are Mixture-of-Depths layers: each one runs only
on a request's text tokens plus the top-k of its visual tokens, k shrinking layer by layer
(progressive ratio decay). Skipped tokens are re-weighted and carried on (STRing), and only the
tokens a layer processed enter its KV cache. The runner (`pmod_serve.v1.worker.model_runner`) gives every p-MoD
layer a compacted KV index space and tells the model which batch tokens are routing targets.

Reads top-down:
  1. multimodal processing: images -> CLIP crops and the spec's number of visual tokens;
  2. vision tower (CLIP, layer -2, patch features) and the mlp2x_gelu projector;
  3. the p-MoD decoder layer: router, TanhNorm, per-request top-k, STRing;
  4. the decoder and the full model, with weight loading from the released LLaVA names.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Annotated

import torch
from PIL import Image
from torch import nn
from transformers import BatchFeature, CLIPVisionConfig
from vllm import ir
from vllm.compilation.decorators import support_torch_compile
from vllm.config import CompilationMode, VllmConfig
from vllm.config.multimodal import BaseDummyOptions
from vllm.distributed import get_pp_group
from vllm.forward_context import get_forward_context, is_forward_context_available, set_forward_context
from vllm.logger import init_logger
from vllm.model_executor.custom_op import CustomOp
from vllm.model_executor.layers.activation import get_act_fn
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.clip import CLIPVisionModel
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaModel
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageProcessorItems, ImageSize, MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
)
from vllm.platforms import current_platform
from vllm.sequence import IntermediateTensors
from vllm.utils.tensor_schema import TensorSchema, TensorShape

from pmod_serve import envs
from pmod_serve.multimodal.image_processing import PixelNormalization, crop_pixels
from pmod_serve.pmod.image_layout import ImageLayout, merge_image_features, num_crops, num_visual_tokens
from pmod_serve.pmod.routing import PmodRouting, RoutingPlan
from pmod_serve.pmod.schedule import PmodSchedule, WeightNorm, kept_target_count
from pmod_serve.tokenizers.prompt import IMAGE_MARKER
from pmod_serve.transformers_utils.vision_tower import image_layout_of, resolve_vision_tower

logger = init_logger("vllm.pmod_serve")  # shown with vLLM's log configuration

# ---------------------------------------------------------------------------------------------
# 1. Multimodal processing
# ---------------------------------------------------------------------------------------------


class PmodProcessingInfo(BaseProcessingInfo):
    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    @cached_property
    def image_layout(self) -> ImageLayout:
        return image_layout_of(self.get_hf_config(), self.ctx.model_config.model)

    @property
    def image_token_id(self) -> int:
        # One past the text vocabulary; `pmod_serve.tokenizers.pmod` maps `<image>` to it.
        return self.get_hf_config().vocab_size

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        return num_visual_tokens(image_width, image_height, self.image_layout)

    def get_image_size_with_most_features(self) -> ImageSize:
        layout = self.image_layout
        candidates = [(layout.crop_size, layout.crop_size), *layout.grid_pinpoints]
        width, height = max(candidates, key=lambda size: num_visual_tokens(size[0], size[1], layout))
        return ImageSize(width=width, height=height)


class PmodDummyInputsBuilder(BaseDummyInputsBuilder[PmodProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return IMAGE_MARKER * mm_counts.get("image", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int],
                          mm_options: Mapping[str, BaseDummyOptions]):
        size = self.info.get_image_size_with_most_features()
        images = self._get_dummy_images(
            width=size.width, height=size.height, num_images=mm_counts.get("image", 0),
            overrides=mm_options.get("image"),
        )
        return {"image": images}


class PmodMultiModalProcessor(BaseMultiModalProcessor[PmodProcessingInfo]):
    """Images are cut into CLIP crops by `pmod_serve.multimodal.image_processing` (no HF processor
    exists for the LLaVA layout) and travel to the engine as 8-bit pixels, normalised on the
    model's device; each `<image>` placeholder is then expanded to the image's visual tokens."""

    def _call_hf_processor(self, prompt: str, mm_data: Mapping[str, object],
                           mm_kwargs: Mapping[str, object], tok_kwargs: Mapping[str, object]) -> BatchFeature:
        tokenizer = self.info.get_tokenizer()
        data: dict[str, object] = {"input_ids": [tokenizer.encode(prompt, add_special_tokens=True)]}
        images: Sequence[Image.Image] = mm_data.get("images", [])  # type: ignore[assignment]
        if images:
            layout = self.info.image_layout
            # Every image's crops, one after the other (see `_get_mm_fields_config`).
            data["pixel_values"] = torch.cat([crop_pixels(image, layout) for image in images])
            data["image_sizes"] = torch.tensor([image.size for image in images], dtype=torch.int64)
        return BatchFeature(data, tensor_type=None)

    def _hf_processor_applies_updates(self, *args, **kwargs) -> bool:
        return False

    def _get_mm_fields_config(self, hf_inputs: BatchFeature,
                              hf_processor_mm_kwargs: Mapping[str, object]) -> Mapping[str, MultiModalFieldConfig]:
        layout = self.info.image_layout
        crops_per_image = torch.tensor([num_crops(width, height, layout)
                                        for width, height in hf_inputs.get("image_sizes", torch.empty(0, 2)).tolist()],
                                       dtype=torch.int64)
        return dict(
            # Crops of all the step's images in one tensor, whatever their counts: vLLM then
            # batches them into one pinned buffer and one asynchronous copy. (Per image, images
            # of different crop counts would reach the GPU as separate copies from pageable
            # memory, each of which may wait for the GPU.)
            pixel_values=MultiModalFieldConfig.flat_from_sizes("image", crops_per_image),
            # Read on the host (`embed_multimodal` stitches each image's tiles by its size): kept
            # on the CPU, as vLLM's LLaVA-NeXT does, since reading a device copy would make every
            # image step wait for the GPU to finish the work queued before it.
            image_sizes=MultiModalFieldConfig.batched("image", keep_on_cpu=True),
        )

    def _get_prompt_updates(self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: MultiModalKwargsItems) -> Sequence[PromptUpdate]:
        image_token_id = self.info.image_token_id

        def visual_tokens(item_idx: int) -> list[int]:
            size = mm_items.get_items("image", ImageProcessorItems).get_image_size(item_idx)
            return [image_token_id] * self.info.get_num_image_tokens(
                image_width=size.width, image_height=size.height
            )

        return [PromptReplacement(modality="image", target=[image_token_id], replacement=visual_tokens)]


class PmodImagePixelInputs(TensorSchema):
    """What the processor hands the model per batch of images.

    Dimensions: bn = images in the batch, bnc = CLIP crops of all of them, image after image (an
    image has 1, or 1 + tiles for anyres: `num_crops` of its size), h = w = the CLIP crop side.
    Pixels are 8-bit, not yet normalised (`PixelNormalization`)."""

    pixel_values: Annotated[torch.Tensor, TensorShape("bnc", 3, "h", "w")]
    # (width, height) of each original image, as PIL gives it.
    image_sizes: Annotated[torch.Tensor, TensorShape("bn", 2)]


# ---------------------------------------------------------------------------------------------
# 2. Vision tower and projector
# ---------------------------------------------------------------------------------------------


class PmodProjector(nn.Module):
    """`mlp2x_gelu`: Linear(vision -> hidden), GELU, Linear(hidden -> hidden)."""

    def __init__(self, vision_hidden_size: int, text_hidden_size: int, prefix: str = "") -> None:
        super().__init__()
        self.linear_1 = ColumnParallelLinear(vision_hidden_size, text_hidden_size, bias=True,
                                             prefix=f"{prefix}.linear_1")
        self.act = get_act_fn("gelu")
        self.linear_2 = RowParallelLinear(text_hidden_size, text_hidden_size, bias=True,
                                          prefix=f"{prefix}.linear_2")

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.linear_1(features)
        hidden, _ = self.linear_2(self.act(hidden))
        return hidden


# ---------------------------------------------------------------------------------------------
# 3. The p-MoD decoder layer
# ---------------------------------------------------------------------------------------------


class PmodRouter(nn.Module):
    """One logit per token. Replicated on every tensor-parallel rank: identical inputs give every
    rank the same top-k, so the ranks' KV caches stay consistent."""

    def __init__(self, hidden_size: int, bias: bool, prefix: str = "") -> None:
        super().__init__()
        self.router = ReplicatedLinear(hidden_size, 1, bias=bias, prefix=f"{prefix}.router")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits, _ = self.router(hidden_states)
        return logits.squeeze(-1)


class PmodDecoderLayer(nn.Module):
    """A LLaMA decoder layer that processes only the kept tokens (docs/p-mod.md, "A p-MoD layer at prefill")."""

    def __init__(self, vllm_config: VllmConfig, layer_index: int, retention_ratio: float,
                 weight_norm: WeightNorm, router_bias: bool, prefix: str) -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.layer_index = layer_index
        self.retention_ratio = retention_ratio
        self.weight_norm = weight_norm
        self.decoder_layer = LlamaDecoderLayer(vllm_config, prefix=f"{prefix}.decoder_layer", config=config)
        self.router = PmodRouter(config.hidden_size, router_bias, prefix=f"{prefix}.router")

    def forward(self, positions: torch.Tensor, x: torch.Tensor, routing: PmodRouting | None,
                num_kept_tokens: torch.Tensor | None = None) -> torch.Tensor:
        if routing is None:
            # No visual tokens in this step (decoding, text-only): every token is kept.
            mlp_out, h = self.decoder_layer(positions, x, None)
            return h + mlp_out

        target_index = routing.target_index
        weights = self.router_weights(x, routing)
        kept_index = self.kept_token_index(weights, routing, x.shape[0], num_kept_tokens)

        # The decoder layer on the kept tokens only, in their original order and positions:
        # exactly what the compacted attention metadata of this layer's KV group expects.
        mlp_out, h = self.decoder_layer(positions.index_select(0, kept_index), x.index_select(0, kept_index), None)

        # STRing: kept targets y = h + w*m, kept text y = h + m, skipped targets y = w*x.
        # (index_select / index_copy_: a Python-scalar item assignment would wait for the GPU.)
        token_weight = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
        token_weight.index_copy_(0, target_index, weights.to(x.dtype).unsqueeze(1))
        out = token_weight * x
        out.index_copy_(0, kept_index, h + token_weight.index_select(0, kept_index) * mlp_out)
        return out

    def router_weights(self, x: torch.Tensor, routing: PmodRouting) -> torch.Tensor:
        """Router weights of the target tokens, normalised per request (TanhNorm)."""
        logits = self.router(x.index_select(0, routing.target_index))
        if self.weight_norm.elementwise:
            return self.weight_norm.apply(logits)
        return torch.cat([self.weight_norm.apply(logits[start:end]) for start, end in routing.segments])

    def kept_token_index(self, weights: torch.Tensor, routing: PmodRouting, num_tokens: int,
                         num_kept_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Batch indices of the tokens this layer processes: every non-target token and each
        request's top-k targets (k = `kept_target_count`), in batch order.

        Compiled (`num_kept_tokens` given), one sort for all requests at once (no per-request
        loop: the same graph serves any batch): targets by weight, best first, then stably by
        request; a target is kept if its rank in its request is below that request's k. Equal
        weights rank in batch order. The number of kept tokens is known on the host
        (`num_kept_tokens`: a tensor of that length, so that torch.compile sees a size, not a
        constant), so nothing waits for the GPU."""
        if num_kept_tokens is None:
            return self.kept_token_index_eager(weights, routing, num_tokens)
        target_index, target_segment = routing.target_index, routing.target_segment
        by_weight = torch.sort(weights, descending=True, stable=True).indices
        by_request = by_weight.index_select(0, torch.sort(target_segment.index_select(0, by_weight), stable=True).indices)
        segment = target_segment.index_select(0, by_request)
        rank = torch.arange(by_request.shape[0], device=weights.device) - routing.segment_start.index_select(0, segment)
        keep = rank < routing.kept_targets[self.layer_index].index_select(0, segment)
        kept = torch.ones(num_tokens, dtype=torch.bool, device=weights.device).index_fill_(0, target_index, False)
        kept.index_put_((target_index.index_select(0, by_request),), keep)
        return torch.nonzero_static(kept, size=num_kept_tokens.shape[0]).squeeze(1)

    def kept_token_index_eager(self, weights: torch.Tensor, routing: PmodRouting, num_tokens: int) -> torch.Tensor:
        """`kept_token_index` op by op: one `torch.topk` per request (the reference's definition),
        a third of the kernels of the segmented sort, which is what counts when each is launched
        from Python."""
        target_index = routing.target_index
        chosen = []
        for start, end in routing.segments:
            top = torch.topk(weights[start:end], kept_target_count(end - start, self.retention_ratio)).indices
            chosen.append(top + start if start else top)
        kept = torch.ones(num_tokens, dtype=torch.bool, device=weights.device).index_fill_(0, target_index, False)
        kept.index_fill_(0, target_index.index_select(0, torch.cat(chosen) if len(chosen) > 1 else chosen[0]), True)
        # The count is known on the host: no device-to-host sync to size the result.
        return torch.nonzero_static(kept, size=num_tokens - routing.num_skipped[self.layer_index]).squeeze(1)


# ---------------------------------------------------------------------------------------------
# Steps that route visual tokens: the decoder as one compiled graph
# ---------------------------------------------------------------------------------------------
#
# A step that routes visual tokens gathers a different number of tokens in every p-MoD layer, so
# vLLM's compiled graph and its CUDA graphs (one token count for all layers) do not apply. Run op
# by op, its ~1,000 kernel launches cost the host more time than the GPU needs for them. So the
# whole decoder of such a step is a second torch.compile'd function, traced with dynamic token
# counts: one per step, one per layer's kept tokens (given as tensor lengths), the targets'.
# vLLM's attention ops stay opaque calls inside it, as in vLLM's own graph.


def routed_decoder(layers: nn.ModuleList, positions: torch.Tensor, hidden_states: torch.Tensor,
                   routing: PmodRouting, num_kept_tokens: list[torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The decoder layers of a routed step: (hidden states, residual)."""
    residual = None
    for layer in layers:
        if isinstance(layer, PmodDecoderLayer):
            # p-MoD layers re-weight their input, so they take it materialised.
            x = hidden_states if residual is None else hidden_states + residual
            hidden_states = layer(positions, x, routing, num_kept_tokens[layer.layer_index])
            residual = None
        else:
            hidden_states, residual = layer(positions, hidden_states, residual)
    return hidden_states, residual


@dataclass(frozen=True)
class RoutedSteps:
    """How routed steps run `routed_decoder`: compiled with `backend`, or eagerly (None), and
    the most target tokens a compiled step may route (`PMOD_ROUTED_STEP_COMPILE_MAX_TARGETS`)."""

    backend: str | None
    max_targets: int = 0
    decoder: Callable = routed_decoder

    @classmethod
    def compiled(cls, backend: str | None, max_targets: int) -> RoutedSteps:
        if backend is None:
            return cls(backend=None)
        # dynamic: every token count is a size of the graph, not a constant; fullgraph: a graph
        # break would silently bring back op-by-op execution.
        compiled = torch.compile(routed_decoder, backend=backend, dynamic=True, fullgraph=True)

        def decoder(*args):
            # vLLM IR ops (RMSNorm) traced through to their implementation for the engine's
            # priority (native under torch.compile), instead of as opaque ops: vLLM's own graph
            # gets there with a lowering pass, and an in-place kernel behind an opaque op
            # returns its mutated inputs, which inductor does not expect (wrong results).
            with ir.enable_torch_wrap(False):
                return compiled(*args)

        return cls(backend=backend, max_targets=max_targets, decoder=decoder)

    def compiles(self, routing: PmodRouting, num_tokens: int) -> bool:
        """Whether this step runs compiled. torch.compile specialises sizes 0 and 1 (a step with one
        target, or a layer keeping one token, would compile a new graph in the middle of serving:
        a minute on a 7B) and cannot trace a layer that keeps no token; such rare steps (a chunk
        that ends one visual token into an image) run eagerly. So do steps with more targets
        than `max_targets` (on a GPU, steps of more than one 672x672 image by default), whose
        compiled top-k costs the host more than the eager one."""
        if self.backend is None:
            return False
        num_targets = routing.target_index.shape[0]
        fewest_kept = num_tokens - max(routing.num_skipped)
        return min(num_tokens, num_targets, fewest_kept) >= 2 and num_targets <= self.max_targets

    def run(self, layers: nn.ModuleList, positions: torch.Tensor, hidden_states: torch.Tensor,
            routing: PmodRouting) -> tuple[torch.Tensor, torch.Tensor | None]:
        num_tokens = hidden_states.shape[0]
        if not self.compiles(routing, num_tokens):
            return routed_decoder(layers, positions, hidden_states, routing, [None] * len(routing.num_skipped))
        # Per layer, an empty tensor as long as the layer's kept-token set: a size, not a constant.
        num_kept_tokens = [torch.empty((num_tokens - skipped, 0), device=hidden_states.device)
                           for skipped in routing.num_skipped]
        return self.decoder(layers, positions, hidden_states, routing, num_kept_tokens)


def routed_step_backend(schedule: PmodSchedule, vllm_config: VllmConfig) -> str | None:
    """The torch.compile backend of routed steps (`PMOD_ROUTED_STEP_COMPILE`), None for eager.

    Eager by default: on one H200, end to end under `vllm bench serve`, the inductor graph served
    0.84-0.98x the eager step's requests/s at concurrency 32 and 0.89-0.91x at 256 (runs 5, 11,
    13) and takes ~3 more minutes to start. It halves the host time of a one-image step in
    process, but a loaded step (two images beside ~130 decodes) costs its host more than the
    eager decoder (76 vs 55 ms under the profiler): its per-layer top-k is two stable sorts over
    all targets, each several cub launches (benchmarks/results/routed_compile_gpu/, step 5).
    Those runs compiled every routed step; steps of more than 4,096 targets now run eagerly
    (`RoutedSteps.compiles`), which those runs did not measure. "inductor" was checked (float32
    exact) on one CUDA GPU per engine with vLLM compiling, unquantized weights and KV cache;
    elsewhere it is taken as asked, with a warning. A softmax router norm (per request, from
    host-side bounds) is always eager."""
    choice = envs.PMOD_ROUTED_STEP_COMPILE
    if choice == "eager" or not schedule.weight_norm.elementwise:
        return None
    checked = (
        current_platform.is_cuda()
        and vllm_config.compilation_config.mode != CompilationMode.NONE
        and vllm_config.parallel_config.tensor_parallel_size == 1
        and vllm_config.model_config.quantization is None
        and vllm_config.cache_config.cache_dtype == "auto"
    )
    if choice == "inductor" and not checked:
        logger.warning(
            "p-MoD: PMOD_ROUTED_STEP_COMPILE=inductor in a configuration where the compiled routed step "
            "was not checked for exactness (checked: one CUDA GPU per engine, vLLM compiling, "
            "unquantized weights and KV cache)"
        )
    return choice


# ---------------------------------------------------------------------------------------------
# 4. Decoder and model
# ---------------------------------------------------------------------------------------------


# With torch.compile on, vLLM runs its custom ops (rotary embedding, SiluAndMul, RMSNorm, ...) as
# their PyTorch-native code, written for Inductor to fuse. Steps that route visual tokens call
# attention and top-k outside any graph, where that code would be several unfused kernels per op:
# there the ops call vLLM's CUDA kernels instead. Whatever torch.compile traces (vLLM's graph,
# the routed-step pieces) uses the native code, on every platform (a CPU kernel's dispatch code
# is not traceable).
_EAGER_KERNEL_PROVIDER = "vllm_c"


def native_when_compiling(model: nn.Module) -> None:
    cuda = current_platform.is_cuda_alike()
    for module in model.modules():
        if not isinstance(module, CustomOp) or module._enforce_enable:
            continue
        if cuda and (module.enabled() or type(module).forward_cuda is CustomOp.forward_cuda):
            continue  # a CUDA kernel vLLM keeps under torch.compile, or none of its own
        eager = module.forward_cuda if cuda else module._forward_method
        module._forward_method = _native_when_compiling(module.forward_native, eager)


def _native_when_compiling(native, cuda):
    def forward(*args, **kwargs):
        return native(*args, **kwargs) if torch.compiler.is_compiling() else cuda(*args, **kwargs)

    return forward


@contextlib.contextmanager
def eager_kernel_priority():
    """vLLM IR ops (RMSNorm) dispatch at call time: prefer the CUDA kernels while this lasts."""
    with contextlib.ExitStack() as stack:
        if current_platform.is_cuda_alike():
            for op in (ir.ops.rms_norm, ir.ops.fused_add_rms_norm):
                impl = op.impls.get(_EAGER_KERNEL_PROVIDER)
                if impl is not None and impl.supported:
                    stack.enter_context(op.set_priority([_EAGER_KERNEL_PROVIDER, "native"]))
        yield


# vLLM's torch.compile traces the decoder of steps that route nothing (decoding, text, or images
# whose prefill is already done). Steps that route visual tokens skip that graph (`skip_compiled`,
# set by the model below: top-k and gathers of a data-dependent size) and run this code with each
# layer split at attention (`RoutedSteps`).
@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": 0, "inputs_embeds": 0})
class PmodLlamaModel(nn.Module):
    def __init__(self, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        schedule = PmodSchedule.from_config(config)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   prefix=f"{prefix}.embed_tokens")
        layers: list[nn.Module] = []
        for index in range(config.num_hidden_layers):
            layer_prefix = f"{prefix}.layers.{index}"
            if schedule.is_pmod_layer(index):
                layers.append(PmodDecoderLayer(vllm_config, index, schedule.retention_ratio[index],
                                               schedule.weight_norm, schedule.router_bias, layer_prefix))
            else:
                layers.append(LlamaDecoderLayer(vllm_config, prefix=layer_prefix, config=config))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.routed_steps = RoutedSteps.compiled(routed_step_backend(schedule, vllm_config),
                                                 envs.PMOD_ROUTED_STEP_COMPILE_MAX_TARGETS)

    @property
    def retention_ratios(self) -> list[float | None]:
        """Per layer, its retention ratio (None: a layer that keeps every token)."""
        return [layer.retention_ratio if isinstance(layer, PmodDecoderLayer) else None for layer in self.layers]

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                inputs_embeds: torch.Tensor | None, routing: PmodRouting | None) -> torch.Tensor:
        hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_tokens(input_ids)
        if routing is None:  # what vLLM's compiled graph traces
            residual = None
            for layer in self.layers:
                if isinstance(layer, PmodDecoderLayer):
                    x = hidden_states if residual is None else hidden_states + residual
                    hidden_states, residual = layer(positions, x, None), None
                else:
                    hidden_states, residual = layer(positions, hidden_states, residual)
        else:
            hidden_states, residual = self.routed_steps.run(self.layers, positions, hidden_states, routing)
        if residual is None:
            return self.norm(hidden_states)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


# Text tokens of the made-up routed step that compiles the routed-step decoder at start-up.
WARM_UP_TEXT_TOKENS = 37


@MULTIMODAL_REGISTRY.register_processor(
    PmodMultiModalProcessor, info=PmodProcessingInfo, dummy_inputs=PmodDummyInputsBuilder
)
class PmodLlavaLlamaForCausalLM(nn.Module, SupportsMultiModal):
    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return IMAGE_MARKER
        raise ValueError("p-MoD-LLaVA only supports images")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        if get_pp_group().world_size > 1:
            raise NotImplementedError("p-MoD-LLaVA does not support pipeline parallelism")
        self.config = config
        self.vllm_config = vllm_config
        self.quant_config = vllm_config.quant_config
        self.routing: PmodRouting | None = None
        self.configure_mm_token_handling(vocab_size=config.vocab_size, mm_token_ids=[config.vocab_size])

        vision_dir = resolve_vision_tower(config.mm_vision_tower, vllm_config.model_config.model)
        vision_config = CLIPVisionConfig.from_pretrained(vision_dir)
        self.layout = image_layout_of(config, vllm_config.model_config.model)
        if config.mm_vision_select_feature != "patch":
            raise ValueError(f"mm_vision_select_feature={config.mm_vision_select_feature!r} is not supported")
        # hidden_states[select_layer] of HF CLIP = the output of that many encoder layers.
        num_vision_layers = config.mm_vision_select_layer % (vision_config.num_hidden_layers + 1)
        with self._mark_tower_model(vllm_config, "image"):
            self.pixel_normalization = PixelNormalization(self.layout)
            self.vision_tower = CLIPVisionModel(
                vision_config, num_hidden_layers_override=num_vision_layers, require_post_norm=False,
                prefix=maybe_prefix(prefix, "vision_tower"),
            )
            self.projector = PmodProjector(config.mm_hidden_size, config.hidden_size,
                                           prefix=maybe_prefix(prefix, "projector"))
            self.image_newline = (
                nn.Parameter(torch.empty(config.hidden_size)) if self.layout.is_anyres else None
            )
        with self._mark_language_model(vllm_config):
            self.model = PmodLlamaModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size,
                                          prefix=maybe_prefix(prefix, "lm_head"))
        self.logits_processor = LogitsProcessor(config.vocab_size)
        native_when_compiling(self)

    # -- runner hook --------------------------------------------------------------------------

    def set_pmod_routing(self, routing: PmodRouting | None) -> None:
        """Called by the p-MoD runner before each forward pass."""
        self.routing = routing

    def warm_up_routed_steps(self) -> None:
        """Compile the routed-step decoder at start-up instead of in the first image request:
        one routed step of made-up tokens, without attention metadata (attention is skipped, as
        in vLLM's profiling runs). Inputs are made the way the runner makes them (ordinary
        tensors; the step runs in inference mode): torch.compile tells the two kinds apart."""
        steps = self.model.routed_steps
        if steps.backend is None:
            return
        start = time.perf_counter()
        weight = self.model.embed_tokens.weight
        device = weight.device
        # A step that runs compiled: at most `max_targets` targets besides its text.
        max_tokens = min(self.vllm_config.scheduler_config.max_num_batched_tokens,
                         steps.max_targets + WARM_UP_TEXT_TOKENS)
        num_tokens, num_targets = self._warm_up_sizes(max_tokens)
        with torch.no_grad():
            plan = RoutingPlan.of([num_targets], self.model.retention_ratios)
            routing = plan.routing(torch.arange(num_tokens - num_targets, num_tokens, device=device))
            positions = torch.arange(num_tokens, device=device)
            # A generator of its own: vLLM has already reset the global seed when this runs.
            generator = torch.Generator(device).manual_seed(0)
            embeddings = torch.randn(num_tokens, weight.shape[1], device=device, dtype=weight.dtype,
                                     generator=generator) * 0.02
        if not steps.compiles(routing, num_tokens):
            raise ValueError(f"PMOD_ROUTED_STEP_COMPILE_MAX_TARGETS={steps.max_targets} leaves no step to compile "
                             f"(the warm-up step of {num_targets} targets would run eagerly); raise it, or leave "
                             "PMOD_ROUTED_STEP_COMPILE unset")
        self.set_pmod_routing(routing)
        try:
            with torch.inference_mode(), set_forward_context(None, self.vllm_config):
                self.forward(None, positions, inputs_embeds=embeddings)
        finally:
            self.set_pmod_routing(None)
        logger.info("p-MoD: the decoder of steps that route visual tokens compiled (torch.compile, %s; steps of at "
                    "most %d targets) in %.1f s", steps.backend, steps.max_targets, time.perf_counter() - start)

    def _warm_up_sizes(self, max_tokens: int) -> tuple[int, int]:
        """Token and target counts whose kept-token counts differ per retention ratio and from
        every dimension of the model: torch.compile would assume sizes that are equal while it
        traces stay equal."""
        dims = {size for parameter in self.parameters() for size in parameter.shape}
        ratios = sorted({ratio for ratio in self.model.retention_ratios if ratio is not None})
        num_tokens = min(max_tokens, self.config.max_position_embeddings, 3001) - 1
        while num_tokens > WARM_UP_TEXT_TOKENS + 2:
            num_targets = num_tokens - WARM_UP_TEXT_TOKENS
            kept = [num_tokens - num_targets + kept_target_count(num_targets, ratio) for ratio in ratios]
            sizes = [num_tokens, num_targets, *kept]
            if len(set(sizes)) == len(sizes) and not dims & set(sizes):
                return num_tokens, num_targets
            num_tokens -= 1
        return num_tokens, num_tokens - WARM_UP_TEXT_TOKENS  # too small to compile (`warm_up_routed_steps` says so)

    # -- images ------------------------------------------------------------------------------

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None:
            return []
        images = PmodImagePixelInputs(
            pixel_values=pixel_values,
            image_sizes=kwargs.get("image_sizes"),
            resolve_bindings={"h": self.layout.crop_size, "w": self.layout.crop_size},
        )
        image_sizes = images.image_sizes.tolist()  # on the CPU (`_get_mm_fields_config`)
        crops_per_image = [num_crops(width, height, self.layout) for width, height in image_sizes]
        if sum(crops_per_image) != images.pixel_values.shape[0]:
            raise ValueError(f"{images.pixel_values.shape[0]} crops for images of {crops_per_image} crops")
        crops = self.pixel_normalization(images.pixel_values).to(self.vision_tower.dtype)
        # Layer -2 of CLIP without its CLS token, then the projector.
        features = self.projector(self.vision_tower(crops)[:, 1:])
        return [merge_image_features(image_features, width, height, self.layout, self.image_newline)
                for image_features, (width, height) in zip(features.split(crops_per_image), image_sizes)]

    def get_language_model(self) -> nn.Module:
        return self.model

    # -- decoding ----------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None, **kwargs: object) -> torch.Tensor:
        if self.routing is None:
            return self.model(input_ids, positions, inputs_embeds, None)
        # Routing visual tokens: not vLLM's graph but the routed-step decoder (RoutedSteps); run
        # eagerly, it uses vLLM's CUDA kernels (see native_when_compiling).
        if is_forward_context_available():
            get_forward_context().skip_compiled = True
        eager = not self.model.routed_steps.compiles(self.routing, positions.shape[0])
        with eager_kernel_priority() if eager else contextlib.nullcontext():
            return self.model(input_ids, positions, inputs_embeds, self.routing)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    # -- weights -----------------------------------------------------------------------------

    # Released LLaVA names (docs/p-mod.md, "Weight names") -> this module's names; the decoder's q/k/v and gate/up
    # projections load into vLLM's fused ones (LLaMA's own mapping), CLIP's through its loader.
    hf_to_vllm_mapper = (
        WeightsMapper(
            orig_to_new_prefix={
                "model.vision_tower.vision_tower.": "vision_tower.",
                "model.mm_projector.0.": "projector.linear_1.",
                "model.mm_projector.2.": "projector.linear_2.",
                "model.image_newline": "image_newline",
            }
        )
        | LlamaModel.hf_to_vllm_mapper
    )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # Stale buffers of old checkpoints (`rotary_emb.inv_freq` is skipped by the loader itself).
        loader = AutoWeightsLoader(self, skip_substrs=[".position_ids"])
        loaded = loader.load_weights(weights, mapper=self.hf_to_vllm_mapper)
        # vLLM's own check counts every linear layer as loaded (quantization may fill it later),
        # so a checkpoint without, say, a router would start with uninitialised memory.
        # (Quantized models are left to vLLM: their scales may legitimately come later.)
        missing = sorted(set(dict(self.named_parameters())) - loaded) if self.quant_config is None else []
        if missing:
            raise ValueError(f"p-MoD checkpoint lacks {len(missing)} weight(s) the model needs: {missing[:8]}")
        return loaded
