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
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from typing import Annotated

import torch
from PIL import Image
from torch import nn
from transformers import BatchFeature, CLIPVisionConfig
from vllm import ir
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.config.multimodal import BaseDummyOptions
from vllm.distributed import get_pp_group
from vllm.forward_context import get_forward_context, is_forward_context_available
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

from model_registry import image_layout_of, resolve_vision_tower
from pmod_serve.multimodal.image_processing import preprocess
from pmod_serve.pmod.image_layout import ImageLayout, merge_image_features, num_visual_tokens
from pmod_serve.pmod.routing import PmodRouting
from pmod_serve.pmod.schedule import PmodSchedule, WeightNorm, kept_target_count
from pmod_serve.tokenizers.prompt import IMAGE_MARKER

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
    """Images are preprocessed by `pmod_serve.multimodal.image_processing` (no HF processor exists for the
    LLaVA layout); each `<image>` placeholder is then expanded to the image's visual tokens."""

    def _call_hf_processor(self, prompt: str, mm_data: Mapping[str, object],
                           mm_kwargs: Mapping[str, object], tok_kwargs: Mapping[str, object]) -> BatchFeature:
        tokenizer = self.info.get_tokenizer()
        data: dict[str, object] = {"input_ids": [tokenizer.encode(prompt, add_special_tokens=True)]}
        images: Sequence[Image.Image] = mm_data.get("images", [])  # type: ignore[assignment]
        if images:
            layout = self.info.image_layout
            data["pixel_values"] = [preprocess(image, layout) for image in images]
            data["image_sizes"] = torch.tensor([image.size for image in images], dtype=torch.int64)
        return BatchFeature(data, tensor_type=None)

    def _hf_processor_applies_updates(self, *args, **kwargs) -> bool:
        return False

    def _get_mm_fields_config(self, hf_inputs: BatchFeature,
                              hf_processor_mm_kwargs: Mapping[str, object]) -> Mapping[str, MultiModalFieldConfig]:
        return dict(
            pixel_values=MultiModalFieldConfig.batched("image"),
            image_sizes=MultiModalFieldConfig.batched("image"),
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

    Dimensions: bn = images in the batch, nc = CLIP crops of an image (1, or 1 + tiles for
    anyres; differs per image, so the crops come as a list), h = w = the CLIP crop side."""

    pixel_values: Annotated[torch.Tensor | list[torch.Tensor], TensorShape("bn", "nc", 3, "h", "w", dynamic_dims={"nc"})]
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

    def __init__(self, vllm_config: VllmConfig, retention_ratio: float, weight_norm: WeightNorm,
                 router_bias: bool, prefix: str) -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.retention_ratio = retention_ratio
        self.weight_norm = weight_norm
        self.decoder_layer = LlamaDecoderLayer(vllm_config, prefix=f"{prefix}.decoder_layer", config=config)
        self.router = PmodRouter(config.hidden_size, router_bias, prefix=f"{prefix}.router")

    def forward(self, positions: torch.Tensor, x: torch.Tensor, routing: PmodRouting | None) -> torch.Tensor:
        if routing is None:
            # No visual tokens in this step (decoding, text-only): every token is kept.
            mlp_out, h = self.decoder_layer(positions, x, None)
            return h + mlp_out

        # Router weights of the target tokens, normalised per request (TanhNorm). Gathers and
        # scatters use index_select / index_fill_ / index_copy_: a Python-scalar item assignment
        # (`t[idx] = True`) would copy the scalar to the device and wait for the GPU.
        target_index = routing.target_index
        logits = self.router(x.index_select(0, target_index))
        segments = routing.segments
        if self.weight_norm.elementwise or len(segments) == 1:
            weights = self.weight_norm.apply(logits)
        else:
            weights = torch.cat([self.weight_norm.apply(logits[start:end]) for start, end in segments])
        kept = torch.ones(x.shape[0], dtype=torch.bool, device=x.device).index_fill_(0, target_index, False)
        num_kept_tokens = x.shape[0]
        chosen = []
        for start, end in segments:
            num_kept = kept_target_count(end - start, self.retention_ratio)
            num_kept_tokens -= end - start - num_kept
            top = torch.topk(weights[start:end], num_kept).indices
            chosen.append(top + start if start else top)
        kept.index_fill_(0, target_index.index_select(0, torch.cat(chosen) if len(chosen) > 1 else chosen[0]), True)
        # The count is known on the host: no device-to-host sync to size the result.
        kept_index = torch.nonzero_static(kept, size=num_kept_tokens).squeeze(1)

        # The decoder layer on the kept tokens only, in their original order and positions:
        # exactly what the compacted attention metadata of this layer's KV group expects.
        mlp_out, h = self.decoder_layer(positions.index_select(0, kept_index), x.index_select(0, kept_index), None)

        # STRing: kept targets y = h + w*m, kept text y = h + m, skipped targets y = w*x.
        token_weight = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
        token_weight.index_copy_(0, target_index, weights.to(x.dtype).unsqueeze(1))
        out = token_weight * x
        out.index_copy_(0, kept_index, h + token_weight.index_select(0, kept_index) * mlp_out)
        return out


# ---------------------------------------------------------------------------------------------
# 4. Decoder and model
# ---------------------------------------------------------------------------------------------


# With torch.compile on, vLLM runs its custom ops (rotary embedding, SiluAndMul, RMSNorm, ...) as
# their PyTorch-native code, written for Inductor to fuse. Steps that route visual tokens run
# eagerly, where that code is several unfused kernels per op: there the ops call vLLM's CUDA
# kernels instead; what torch.compile traces stays native.
_EAGER_KERNEL_PROVIDER = "vllm_c"


def use_cuda_kernels_when_eager(model: nn.Module) -> None:
    if not current_platform.is_cuda_alike():
        return
    for module in model.modules():
        if not isinstance(module, CustomOp) or module.enabled() or module._enforce_enable:
            continue
        if type(module).forward_cuda is CustomOp.forward_cuda:
            continue  # no CUDA kernel of its own
        module._forward_method = _native_when_compiling(module.forward_native, module.forward_cuda)


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


# torch.compile traces the decoder of steps that route nothing (decoding, text, or images whose
# prefill is already done); steps that route visual tokens run this code eagerly
# (`skip_compiled`, set by the model below): top-k and gathers of a data-dependent size.
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
                layers.append(PmodDecoderLayer(vllm_config, schedule.retention_ratio[index],
                                               schedule.weight_norm, schedule.router_bias, layer_prefix))
            else:
                layers.append(LlamaDecoderLayer(vllm_config, prefix=layer_prefix, config=config))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                inputs_embeds: torch.Tensor | None, routing: PmodRouting | None) -> torch.Tensor:
        hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            if isinstance(layer, PmodDecoderLayer):
                # p-MoD layers re-weight their input, so they take it materialised.
                x = hidden_states if residual is None else hidden_states + residual
                hidden_states, residual = layer(positions, x, routing), None
            else:
                hidden_states, residual = layer(positions, hidden_states, residual)
        if residual is None:
            return self.norm(hidden_states)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


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
        use_cuda_kernels_when_eager(self)

    # -- runner hook --------------------------------------------------------------------------

    def set_pmod_routing(self, routing: PmodRouting | None) -> None:
        """Called by the p-MoD runner before each forward pass."""
        self.routing = routing

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
        crops_per_image = [len(crops) for crops in images.pixel_values]
        crops = torch.cat(list(images.pixel_values)).to(self.vision_tower.dtype)
        # Layer -2 of CLIP without its CLS token, then the projector.
        features = self.projector(self.vision_tower(crops)[:, 1:])
        embeddings = []
        for image_features, (width, height) in zip(features.split(crops_per_image), images.image_sizes.tolist()):
            embeddings.append(merge_image_features(image_features, width, height, self.layout, self.image_newline))
        return embeddings

    def get_language_model(self) -> nn.Module:
        return self.model

    # -- decoding ----------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None, **kwargs: object) -> torch.Tensor:
        if self.routing is None:
            return self.model(input_ids, positions, inputs_embeds, None)
        # Routing visual tokens: eager, with vLLM's CUDA kernels (see use_cuda_kernels_when_eager).
        if is_forward_context_available():
            get_forward_context().skip_compiled = True
        with eager_kernel_priority():
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
