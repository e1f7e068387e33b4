"""Plain-PyTorch p-MoD-LLaVA inference, written straight from the spec (docs/p-mod.md).

This is the ground truth the vLLM model is compared against, token for token. It is deliberately
simple: one request at a time, no batching, no vLLM, eager attention. It reads top-down like the
paper (arXiv 2412.04449):

1. CLIP ViT-L/14-336 vision tower -> hidden states of ``mm_vision_select_layer``, CLS dropped.
2. ``mlp2x_gelu`` projector, then the image layout (pad / anyres) merges the crops' features.
3. The prompt is tokenised like the released code; visual tokens replace each ``<image>`` marker.
4. A LLaMA decoder whose deeper layers are p-MoD layers: at prefill a router picks the top
   ``trunc(T * ratio)`` visual ("target") tokens; only those and the text tokens go through the
   layer (and into its KV cache); outputs are re-weighted with the router weight (STRing).
5. Greedy decoding: the new tokens are never targets, they run densely through every layer and
   attend to that layer's cached (kept) tokens.

Conventions the vLLM side must share:
- ``generate`` returns greedy ids after the prompt and, like vLLM, includes the EOS id when it stops
  on it. Ties in the argmax go to the lowest id (``torch.argmax``).
- Top-k among a sequence's target tokens is ``torch.topk`` over their router weights ``w`` (in
  sequence order), the kept indices then sorted ascending.
- In ``prompt_token_ids`` every visual token is the placeholder ``image_token_id``: the config's
  ``image_token_index`` if it has one, else ``vocab_size`` (one past the vocabulary).
- ``kv_slots(..., num_generated=n)`` counts the ``n - 1`` tokens fed back after the prompt.

The module tree mirrors the checkpoint's weight names (docs/p-mod.md, "Weight names"), so loading is one strict
``load_state_dict``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from model_registry import (
    CheckpointError,
    Problem,
    check_checkpoint,
    image_layout_of,
    load_state_dict,
    load_vision_config,
    resolve_vision_tower,
)
from pmod_serve.multimodal.image_processing import preprocess
from pmod_serve.pmod.image_layout import (
    ImageLayout,
    merge_image_features,
    num_visual_tokens,
    target_token_mask,
)
from pmod_serve.pmod.schedule import PmodSchedule, WeightNorm, kept_target_count
from pmod_serve.tokenizers.prompt import IMAGE_MARKER, PromptTokenizer

# Most queries per attention block (LlamaAttention): bounds the score matrix at prefill.
ATTENTION_QUERY_BLOCK = 256

# ==================================================================================================
# Vision tower: HF CLIPVisionModel, re-implemented
# ==================================================================================================


@dataclass(frozen=True)
class ClipVisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> ClipVisionConfig:
        # A full CLIPConfig nests the vision part; a CLIPVisionConfig is flat.
        config = config.get("vision_config", config) or {}
        known = cls.__dataclass_fields__
        return cls(**{key: config[key] for key in known if key in config})


def _activation(name: str):
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name == "gelu":
        return F.gelu
    if name == "silu":
        return F.silu
    raise NotImplementedError(f"activation {name!r} is not supported")


class ClipEmbeddings(nn.Module):
    def __init__(self, config: ClipVisionConfig):
        super().__init__()
        num_patches = (config.image_size // config.patch_size) ** 2
        self.class_embedding = nn.Parameter(torch.empty(config.hidden_size))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, config.patch_size, stride=config.patch_size, bias=False
        )
        self.position_embedding = nn.Embedding(num_patches + 1, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # [crops, patches, hidden]
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight[None]


class ClipAttention(nn.Module):
    def __init__(self, config: ClipVisionConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        crops, length, hidden = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(crops, length, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        scores = (q @ k.transpose(-1, -2)) * self.head_dim**-0.5  # no mask: the ViT is bidirectional
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = (probs @ v).transpose(1, 2).reshape(crops, length, hidden)
        return self.out_proj(out)


class ClipMLP(nn.Module):
    def __init__(self, config: ClipVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = _activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ClipEncoderLayer(nn.Module):
    def __init__(self, config: ClipVisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = ClipAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = ClipMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipEncoder(nn.Module):
    def __init__(self, config: ClipVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(ClipEncoderLayer(config) for _ in range(config.num_hidden_layers))


class ClipVisionTransformer(nn.Module):
    def __init__(self, config: ClipVisionConfig):
        super().__init__()
        self.embeddings = ClipEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # sic, HF's name
        self.encoder = ClipEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # unused by LLaVA

    def hidden_state(self, pixel_values: torch.Tensor, select_layer: int) -> torch.Tensor:
        """HF's ``hidden_states[select_layer]``: index 0 is the (pre-layernormed) embeddings, index i
        the output of encoder layer i; -2 is the output of the second-to-last layer."""
        num_layers = len(self.encoder.layers)
        index = select_layer if select_layer >= 0 else num_layers + 1 + select_layer
        if not 0 <= index <= num_layers:
            raise ValueError(f"mm_vision_select_layer {select_layer} is out of range for {num_layers} layers")
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        for layer in self.encoder.layers[:index]:
            x = layer(x)
        return x


class ClipVisionModel(nn.Module):
    def __init__(self, config: ClipVisionConfig):
        super().__init__()
        self.vision_model = ClipVisionTransformer(config)


class LlavaVisionTower(nn.Module):
    """LLaVA's wrapper: selected hidden layer, CLS token dropped for ``"patch"``."""

    def __init__(self, config: ClipVisionConfig, select_layer: int, select_feature: str):
        super().__init__()
        if select_feature not in ("patch", "cls_patch"):
            raise NotImplementedError(f"mm_vision_select_feature {select_feature!r} is not supported")
        self.vision_tower = ClipVisionModel(config)
        self.select_layer = select_layer
        self.select_feature = select_feature

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.vision_tower.vision_model.hidden_state(pixel_values, self.select_layer)
        return features[:, 1:] if self.select_feature == "patch" else features


def build_projector(projector_type: str, mm_hidden_size: int, hidden_size: int) -> nn.Module:
    """``mlp{N}x_gelu``: Linear, then (GELU, Linear) N-1 times; ``linear``: one Linear."""
    if projector_type == "linear":
        return nn.Linear(mm_hidden_size, hidden_size)
    match = re.fullmatch(r"mlp(\d+)x_gelu", projector_type)
    if not match:
        raise NotImplementedError(f"mm_projector_type {projector_type!r} is not supported")
    modules: list[nn.Module] = [nn.Linear(mm_hidden_size, hidden_size)]
    for _ in range(1, int(match.group(1))):
        modules += [nn.GELU(), nn.Linear(hidden_size, hidden_size)]  # exact (erf) GELU
    return nn.Sequential(*modules)


# ==================================================================================================
# LLaMA decoder
# ==================================================================================================


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    hidden_act: str
    attention_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> LlamaConfig:
        if config.get("rope_scaling"):
            raise NotImplementedError(f"rope_scaling {config['rope_scaling']!r} is not supported")
        rope_theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get(
            "rope_theta", 10000.0
        )
        heads = config["num_attention_heads"]
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            hidden_act=config.get("hidden_act", "silu"),
            attention_bias=bool(config.get("attention_bias", False)),
            mlp_bias=bool(config.get("mlp_bias", False)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        )


class LayerKVCache:
    """Keys, values and positions of the tokens one decoder layer has attended over so far.

    A p-MoD layer only ever appends the tokens it kept, so its cache is smaller than the sequence:
    that is the memory the serving plugin saves. Tokens are appended in sequence order, so the
    cached positions ascend.

    The tensors live in buffers with some spare room at the end, so that appending a decoded token
    usually writes one slot instead of copying the whole cache.
    """

    def __init__(self) -> None:
        self._keys: torch.Tensor | None = None  # [num_kv_heads, capacity, head_dim], after RoPE
        self._values: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None  # [capacity]
        self._length = 0  # slots in use

    def __len__(self) -> int:
        return self._length

    @property
    def keys(self) -> torch.Tensor | None:  # [num_kv_heads, slots, head_dim]
        return None if self._keys is None else self._keys[:, : self._length]

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._values is None else self._values[:, : self._length]

    @property
    def positions(self) -> torch.Tensor | None:  # [slots]
        return None if self._positions is None else self._positions[: self._length]

    def extend(
        self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Append new tokens; return everything cached (old + new)."""
        start, stop = self._length, self._length + positions.numel()
        if self._keys is None or stop > self._keys.shape[1]:
            self._grow(keys, values, positions, capacity=stop + max(stop // 4, 16))
        self._keys[:, start:stop] = keys
        self._values[:, start:stop] = values
        self._positions[start:stop] = positions
        self._length = stop
        return self.keys, self.values, self.positions

    def _grow(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, capacity: int) -> None:
        old = (self.keys, self.values, self.positions)
        self._keys = keys.new_empty(keys.shape[0], capacity, keys.shape[2])
        self._values = values.new_empty(values.shape[0], capacity, values.shape[2])
        self._positions = positions.new_empty(capacity)
        if self._length:
            self._keys[:, : self._length], self._values[:, : self._length] = old[0], old[1]
            self._positions[: self._length] = old[2]


class RMSNorm(nn.Module):
    """LLaMA RMSNorm, computed in float32 like HF's LlamaRMSNorm."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


class RotaryEmbedding(nn.Module):
    """HF LLaMA RoPE (rotate-half convention), angles computed in float32 then cast."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Rotate ``q``/``k`` of shape ``[heads, tokens, head_dim]`` by each token's own position."""
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim
        inv_freq = 1.0 / (self.theta**exponents)
        angles = torch.outer(positions.float(), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        cos, sin = angles.cos().to(q.dtype), angles.sin().to(q.dtype)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.rotary_emb = RotaryEmbedding(self.head_dim, config.rope_theta)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv_cache: LayerKVCache) -> torch.Tensor:
        tokens = x.shape[0]
        q = self.q_proj(x).view(tokens, self.num_heads, self.head_dim).transpose(0, 1)
        k = self.k_proj(x).view(tokens, self.num_kv_heads, self.head_dim).transpose(0, 1)
        v = self.v_proj(x).view(tokens, self.num_kv_heads, self.head_dim).transpose(0, 1)
        q, k = self.rotary_emb(q, k, positions)
        keys, values, key_positions = kv_cache.extend(k, v, positions)
        if self.num_kv_heads != self.num_heads:  # grouped-query attention: share each KV head
            group = self.num_heads // self.num_kv_heads
            keys, values = keys.repeat_interleave(group, dim=0), values.repeat_interleave(group, dim=0)

        # softmax(q k^T / sqrt(d)) v, a block of queries at a time so that the score matrix stays
        # small at prefill; the blocks are of (nearly) equal size. A decoded token is one block.
        num_cached = key_positions.numel()
        num_blocks = -(-tokens // ATTENTION_QUERY_BLOCK)
        bounds = [tokens * i // num_blocks for i in range(num_blocks + 1)]
        out = q.new_empty(self.num_heads, tokens, self.head_dim)
        for start, stop in pairwise(bounds):
            block_positions = positions[start:stop]
            # Causal by original position: a kept token sees the kept tokens at or before it. The
            # cached positions ascend, so the keys any query of the block can see are a prefix.
            seen = int(torch.searchsorted(key_positions, block_positions.max(), right=True))
            scores = q[:, start:stop] @ keys[:, :seen].transpose(-1, -2)
            scores /= math.sqrt(self.head_dim)
            if key_positions[seen - 1] > block_positions.min():  # prefill; a decoded token sees all
                scores.masked_fill_(key_positions[None, :seen] > block_positions[:, None], float("-inf"))
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            if seen < num_cached:
                # The unseen keys get probability 0 and still take part in the weighted sum, so that
                # it runs over the whole cache as one full-matrix product would (same float32 sums).
                probs = F.pad(probs, (0, num_cached - seen))
            out[:, start:stop] = probs @ values
        return self.o_proj(out.transpose(0, 1).reshape(tokens, self.num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.act = _activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def residual_parts(
        self, x: torch.Tensor, positions: torch.Tensor, kv_cache: LayerKVCache
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``h = x + Attn(LN1(x))`` and ``m = MLP(LN2(h))``: the layer's output is ``h + m``; p-MoD
        re-weights ``m`` on its own."""
        h = x + self.self_attn(self.input_layernorm(x), positions, kv_cache)
        m = self.mlp(self.post_attention_layernorm(h))
        return h, m

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv_cache: LayerKVCache) -> torch.Tensor:
        h, m = self.residual_parts(x, positions, kv_cache)
        return h + m


# ==================================================================================================
# The p-MoD layer (docs/p-mod.md, "A p-MoD layer at prefill")
# ==================================================================================================


class TokenRouter(nn.Module):
    def __init__(self, hidden_size: int, bias: bool):
        super().__init__()
        self.router = nn.Linear(hidden_size, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.router(x).squeeze(-1)  # one logit per token


@dataclass
class Routing:
    """One p-MoD layer's prefill decision for one sequence."""

    kept_indices: torch.Tensor  # sequence indices the layer processes, ascending
    target_indices: torch.Tensor  # sequence indices of the target tokens, ascending
    target_weights: torch.Tensor  # router weight w of each target token (after the weight norm)


class PmodDecoderLayer(nn.Module):
    """A decoder layer wrapped with a router: at prefill it processes only the text tokens and the
    top ``trunc(T * retention_ratio)`` target tokens, and re-weights with the router weight (STRing)."""

    def __init__(
        self, config: LlamaConfig, retention_ratio: float, weight_norm: WeightNorm, router_bias: bool
    ):
        super().__init__()
        self.decoder_layer = LlamaDecoderLayer(config)
        self.router = TokenRouter(config.hidden_size, router_bias)
        self.retention_ratio = retention_ratio
        self.weight_norm = weight_norm

    def route(self, x: torch.Tensor, target_mask: torch.Tensor) -> Routing:
        target_indices = target_mask.nonzero().squeeze(-1)
        logits = self.router(x)[target_indices]
        weights = self.weight_norm.apply(logits)  # e.g. w = 0.2 * tanh(z) + 1
        k = kept_target_count(target_indices.numel(), self.retention_ratio)  # trunc in float32
        top = torch.topk(weights, k).indices
        kept_mask = ~target_mask
        kept_mask[target_indices[top]] = True
        return Routing(kept_mask.nonzero().squeeze(-1), target_indices, weights)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: LayerKVCache,
        target_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, Routing | None]:
        # No target tokens (a sequence without images, or decoding): an ordinary dense layer.
        if target_mask is None or not bool(target_mask.any()):
            return self.decoder_layer(x, positions, kv_cache), None

        routing = self.route(x, target_mask)
        kept = routing.kept_indices
        # The decoder layer sees only the kept tokens, in order, at their original positions; only
        # they enter this layer's KV cache.
        h, m = self.decoder_layer.residual_parts(x[kept], positions[kept], kv_cache)

        # STRing: every target token is scaled by its router weight w, whether kept or skipped.
        weight = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
        weight[routing.target_indices] = routing.target_weights.to(x.dtype)
        y = weight[:, None] * x  # skipped target: y = w * x (non-target tokens are all kept)
        y[kept] = h + weight[kept, None] * m  # kept non-target: h + m; kept target: h + w * m
        return y, routing


# ==================================================================================================
# p-MoD-LLaVA
# ==================================================================================================


class PmodLlavaModel(nn.Module):
    def __init__(
        self,
        config: Mapping[str, Any],
        llama: LlamaConfig,
        schedule: PmodSchedule,
        vision: ClipVisionConfig,
        layout: ImageLayout,
    ):
        super().__init__()
        self.embed_tokens = nn.Embedding(llama.vocab_size, llama.hidden_size)
        self.layers = nn.ModuleList(
            PmodDecoderLayer(llama, schedule.retention_ratio[i], schedule.weight_norm, schedule.router_bias)
            if schedule.is_pmod_layer(i)
            else LlamaDecoderLayer(llama)
            for i in range(llama.num_hidden_layers)
        )
        self.norm = RMSNorm(llama.hidden_size, llama.rms_norm_eps)
        self.vision_tower = LlavaVisionTower(
            vision, config.get("mm_vision_select_layer", -2), config.get("mm_vision_select_feature", "patch")
        )
        self.mm_projector = build_projector(
            config.get("mm_projector_type", "linear"),
            config.get("mm_hidden_size", vision.hidden_size),
            llama.hidden_size,
        )
        # LLaVA learns a row separator only when it un-pads the anyres feature map.
        if "unpad" in layout.patch_merge_type:
            self.image_newline = nn.Parameter(torch.empty(llama.hidden_size))
        else:
            self.image_newline = None

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: Sequence[LayerKVCache],
        target_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[int, Routing]]:
        """Run the decoder over ``[tokens, hidden]``; ``target_mask`` is given at prefill only."""
        hidden = inputs_embeds
        routings: dict[int, Routing] = {}
        for index, layer in enumerate(self.layers):
            if isinstance(layer, PmodDecoderLayer):
                hidden, routing = layer(hidden, positions, kv_caches[index], target_mask)
                if routing is not None:
                    routings[index] = routing
            else:
                hidden = layer(hidden, positions, kv_caches[index])
        return self.norm(hidden), routings


class PmodLlavaForCausalLM(nn.Module):
    def __init__(
        self,
        config: Mapping[str, Any],
        llama: LlamaConfig,
        schedule: PmodSchedule,
        vision: ClipVisionConfig,
        layout: ImageLayout,
    ):
        super().__init__()
        self.model = PmodLlavaModel(config, llama, schedule, vision, layout)
        self.lm_head = nn.Linear(llama.hidden_size, llama.vocab_size, bias=False)


@dataclass
class PromptInputs:
    """Where a prompt's tokens come from: text ids and one span of visual tokens per image."""

    token_ids: list[int]  # with every image's visual tokens expanded to placeholder ids
    image_spans: list[slice]  # the visual tokens of each image
    target_mask: torch.Tensor | None  # [tokens] bool; None when the sequence has no image
    visual_token_counts: list[int]

    @property
    def num_targets(self) -> int:
        return 0 if self.target_mask is None else int(self.target_mask.sum())


@dataclass
class GenerationOutput:
    token_ids: list[int]
    # Token slots each layer's KV cache holds at the end (the last sampled token is never fed).
    kv_cache_lengths: list[int]


def _read_config(checkpoint_dir: Path) -> dict[str, Any]:
    path = checkpoint_dir / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            checkpoint_dir, [Problem("config.json", "<file>", f"cannot be read: {exc}")]
        ) from None
    if not isinstance(config, dict):
        raise CheckpointError(checkpoint_dir, [Problem("config.json", "<file>", "is not a JSON object")])
    return config


class PmodReference:
    """Greedy p-MoD-LLaVA generation from a released-layout checkpoint directory (docs/p-mod.md, "The released checkpoint layout")."""

    def __init__(
        self,
        checkpoint_dir: str | Path,
        dtype: torch.dtype = torch.float32,
        image_token_id: int | None = None,
    ):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.dtype = dtype
        self.config = _read_config(self.checkpoint_dir)
        state_dict = load_state_dict(self.checkpoint_dir)
        # Names the file and key of every problem (missing / unexpected / mis-shaped weights, bad
        # config keys, unresolvable vision tower) before anything is built.
        check_checkpoint(self.checkpoint_dir, self.config, state_dict)

        self.schedule = PmodSchedule.from_config(self.config)
        self.llama_config = LlamaConfig.from_dict(self.config)
        vision_dir = resolve_vision_tower(self.config["mm_vision_tower"], self.checkpoint_dir)
        vision_config = load_vision_config(vision_dir)
        self.vision_config = ClipVisionConfig.from_dict(vision_config)
        self.layout = image_layout_of(self.config, self.checkpoint_dir)
        # tokenizer.model with the legacy / add_prefix_space settings of tokenizer_config.json
        self.tokenizer = PromptTokenizer.from_checkpoint(self.checkpoint_dir)
        # Placeholder id of a visual token in prompt_token_ids: the config's image_token_index if it
        # has one, else the first id past the vocabulary (as llava-hf checkpoints do).
        if image_token_id is None:
            image_token_id = self.config.get("image_token_index", self.llama_config.vocab_size)
        self.image_token_id = int(image_token_id)

        with torch.device("meta"):
            module = PmodLlavaForCausalLM(
                self.config, self.llama_config, self.schedule, self.vision_config, self.layout
            )
        self._load_weights(module, state_dict)
        self.module = module.eval()
        self.model = module.model

    def _load_weights(self, module: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
        state_dict = dict(state_dict)
        if self.llama_config.tie_word_embeddings and "lm_head.weight" not in state_dict:
            state_dict["lm_head.weight"] = state_dict.get("model.embed_tokens.weight")
        expected = module.state_dict()
        problems = [
            Problem("weights", name, "missing from the checkpoint")
            for name in expected
            if name not in state_dict
        ]
        problems += [
            Problem("weights", name, "not a weight of this model")
            for name in state_dict
            if name not in expected
        ]
        problems += [
            Problem("weights", name, f"shape {list(state_dict[name].shape)}, expected {list(tensor.shape)}")
            for name, tensor in expected.items()
            if name in state_dict and state_dict[name].shape != tensor.shape
        ]
        if problems:
            raise CheckpointError(self.checkpoint_dir, problems)
        module.load_state_dict(
            {name: tensor.to(self.dtype) for name, tensor in state_dict.items()}, strict=True, assign=True
        )

    # ----------------------------------------------------------------------------------------------
    # Inputs
    # ----------------------------------------------------------------------------------------------

    def visual_token_counts(self, images: Sequence[Image.Image]) -> list[int]:
        return [num_visual_tokens(*image.size, self.layout) for image in images]

    def prompt_token_ids(self, prompt: str, images: Sequence[Image.Image]) -> list[int]:
        """Prompt ids with each ``<image>`` expanded to that image's visual tokens (placeholder ids)."""
        return self.prompt_inputs(prompt, images).token_ids

    def prompt_inputs(self, prompt: str, images: Sequence[Image.Image]) -> PromptInputs:
        """Token ids, visual-token spans and target mask of a prompt, without running any model."""
        markers = prompt.count(IMAGE_MARKER)
        if markers != len(images):
            raise ValueError(
                f"the prompt has {markers} {IMAGE_MARKER} marker(s) but {len(images)} image(s) were given"
            )
        counts = self.visual_token_counts(images)
        token_ids: list[int] = []
        image_spans: list[slice] = []
        # -1 is never a vocabulary id: it marks where each image's tokens go.
        for token_id in self.tokenizer.encode_prompt(prompt, image_token_id=-1):
            if token_id == -1:
                count = counts[len(image_spans)]
                image_spans.append(slice(len(token_ids), len(token_ids) + count))
                token_ids.extend([self.image_token_id] * count)
            else:
                token_ids.append(token_id)

        target_mask = None
        if images:  # a sequence without images is never routed
            # Text tokens are targets only for mod_target_token_type "all", as in the released code.
            target_mask = torch.full((len(token_ids),), self.schedule.target_token_type == "all")
            for image, span in zip(images, image_spans, strict=True):
                target_mask[span] = target_token_mask(
                    *image.size, self.layout, self.schedule.target_token_type
                )
        return PromptInputs(token_ids, image_spans, target_mask, counts)

    def encode_image(self, image: Image.Image, *, grad: bool = False) -> torch.Tensor:
        """``[num_visual_tokens, hidden]`` of one image: CLIP -> projector -> layout merge.
        ``grad=True`` records gradients (training, ``pmod_train``); the computation is the same."""
        with torch.set_grad_enabled(grad):
            pixel_values = preprocess(image, self.layout).to(self.dtype)
            features = self.model.mm_projector(self.model.vision_tower(pixel_values))
            return merge_image_features(features, *image.size, self.layout, self.model.image_newline)

    def embed_prompt(
        self, inputs: PromptInputs, images: Sequence[Image.Image], *, grad: bool = False
    ) -> torch.Tensor:
        """``[tokens, hidden]``: text embeddings with each image's visual tokens in its span."""
        with torch.set_grad_enabled(grad):
            token_ids = torch.tensor(inputs.token_ids)
            is_text = torch.ones(len(inputs.token_ids), dtype=torch.bool)
            for span in inputs.image_spans:
                is_text[span] = False
            inputs_embeds = self.model.embed_tokens(token_ids.masked_fill(~is_text, 0))
            for image, span in zip(images, inputs.image_spans, strict=True):
                inputs_embeds[span] = self.encode_image(image, grad=grad)
            return inputs_embeds

    # ----------------------------------------------------------------------------------------------
    # Generation
    # ----------------------------------------------------------------------------------------------

    def _new_caches(self) -> list[LayerKVCache]:
        return [LayerKVCache() for _ in self.model.layers]

    def _next_token(self, hidden: torch.Tensor) -> int:
        logits = self.module.lm_head(hidden[-1]).float()
        return int(torch.argmax(logits))

    @torch.no_grad()
    def generate_with_cache(
        self, prompt: str, images: Sequence[Image.Image], max_new_tokens: int
    ) -> GenerationOutput:
        """Greedy generation that also reports each layer's final KV-cache length."""
        inputs = self.prompt_inputs(prompt, images)
        caches = self._new_caches()
        num_prompt = len(inputs.token_ids)
        inputs_embeds = self.embed_prompt(inputs, images)
        hidden, _ = self.model(inputs_embeds, torch.arange(num_prompt), caches, inputs.target_mask)

        generated: list[int] = []
        while len(generated) < max_new_tokens:
            token_id = self._next_token(hidden)
            generated.append(token_id)
            # Like vLLM, the EOS id is part of the output; the last sampled token is never fed.
            if token_id == self.tokenizer.eos_id or len(generated) == max_new_tokens:
                break
            position = torch.tensor([num_prompt + len(generated) - 1])
            hidden, _ = self.model(self.model.embed_tokens(torch.tensor([token_id])), position, caches)
        return GenerationOutput(generated, [len(cache) for cache in caches])

    def generate(self, prompt: str, images: Sequence[Image.Image], max_new_tokens: int) -> list[int]:
        """Greedy token ids after the prompt, ending with EOS (included) or at ``max_new_tokens``."""
        return self.generate_with_cache(prompt, images, max_new_tokens).token_ids

    # ----------------------------------------------------------------------------------------------
    # Introspection (for comparing against the vLLM model)
    # ----------------------------------------------------------------------------------------------

    def kv_slots(self, prompt: str, images: Sequence[Image.Image], num_generated: int) -> list[int]:
        """Token slots each layer's KV cache holds once ``num_generated`` tokens have been sampled.

        Convention (docs/p-mod.md, "KV cache of one request"): a request that has sampled ``n`` tokens has fed ``n - 1`` of them back
        (the last one is not in any cache yet), so ``G = max(n - 1, 0)``; each p-MoD layer holds
        ``P - T + trunc(T * ratio) + G`` slots and each ordinary layer ``P + G``. A sequence without
        images is never routed (``T = 0``: every layer holds ``P + G``).
        """
        inputs = self.prompt_inputs(prompt, images)
        fed_after_prompt = num_generated - 1 if num_generated > 0 else 0
        return self.schedule.kv_slots(len(inputs.token_ids), inputs.num_targets, fed_after_prompt)

    @torch.no_grad()
    def kept_indices(self, prompt: str, images: Sequence[Image.Image]) -> dict[int, list[int]]:
        """For each p-MoD layer, the prompt positions it keeps at prefill (ascending). Without images
        every position is kept."""
        inputs = self.prompt_inputs(prompt, images)
        num_prompt = len(inputs.token_ids)
        inputs_embeds = self.embed_prompt(inputs, images)
        _, routings = self.model(
            inputs_embeds, torch.arange(num_prompt), self._new_caches(), inputs.target_mask
        )
        return {
            layer: routings[layer].kept_indices.tolist() if layer in routings else list(range(num_prompt))
            for layer in sorted(self.schedule.retention_ratio)
        }
