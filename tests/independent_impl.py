"""An independent implementation of the p-MoD spec (docs/p-mod.md), for cross-checking.

Written straight from the spec on top of transformers' own modules (CLIPVisionModel, LlamaDecoderLayer
pieces, LlamaRMSNorm, LlamaRotaryEmbedding, eager attention with an explicit mask over the kept
tokens). It deliberately shares no code with pmod_serve or model_registry: its own config parsing,
weight loading, image preprocessing (PIL + numpy), prompt tokenisation (SentencePiece, slow-LLaMA
style), PRD schedule, TanhNorm, top-k, STRing and greedy decoding with a KV cache of kept tokens.

`make_foreign_checkpoint` writes a checkpoint in the released layout by a different route than
model_registry.tiny: transformers' LlamaForCausalLM and CLIPVisionModel with their own random
init, renamed into the LLaVA / p-MoD names and saved as PyTorch .bin shards with an index.
"""

from __future__ import annotations

import io
import json
import math
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm
import torch
from PIL import Image
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

IMAGE_MARKER = "<image>"
EOS_ID = 2
VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# openai/clip-vit-large-patch14-336, for checkpoints that name the hub id instead of a directory.
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                  projection_dim=768)


# =========================================================================== docs/p-mod.md, "Progressive ratio decay"


def prd_schedule(config: dict[str, Any]) -> dict[int, float]:
    """Layer index -> retention ratio of every p-MoD layer (docs/p-mod.md, "Progressive ratio decay")."""
    layers = config["num_hidden_layers"]
    factor = float(config.get("mod_router_factor", 0.5))
    kind = config["mod_target_layers"]
    decay = re.fullmatch(r"(shiftedcos|shiftedlinear)_decay_([\d.]+)_([\d.]+)", kind)
    if decay:
        max_ratio, min_ratio = float(decay.group(2)), float(decay.group(3))
        schedule = {}
        for i in range(layers):
            if decay.group(1) == "shiftedcos":
                r = math.cos(i * math.pi / 31) / 2 + factor
            else:
                r = (0.5 - i / 31) + factor
            if r <= max_ratio:
                schedule[i] = max(r, min_ratio)
        return schedule
    chosen = {
        "deep_all": range(2, layers - 1),
        "deep_all_include_last": range(2, layers),
        "interleave": range(1, layers, 2),
    }[kind]
    return {i: factor for i in chosen}


def parse_weight_norm(text: str) -> tuple[str, float, float]:
    parts = text.split("_")
    if len(parts) == 1:
        return parts[0], 1.0, 1.0
    return parts[0], float(parts[1]), float(parts[2])


# =========================================================================== weights on disk


def read_checkpoint_weights(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (checkpoint_dir / index_name).exists():
            files = sorted(set(json.loads((checkpoint_dir / index_name).read_text())["weight_map"].values()))
            break
    else:
        files = [n for n in ("model.safetensors", "pytorch_model.bin") if (checkpoint_dir / n).exists()]
    weights: dict[str, torch.Tensor] = {}
    for name in files:
        if name.endswith(".safetensors"):
            from safetensors.torch import load_file

            weights.update(load_file(str(checkpoint_dir / name)))
        else:
            weights.update(torch.load(str(checkpoint_dir / name), map_location="cpu", weights_only=True))
    return {k: v.float() for k, v in weights.items() if not k.endswith("rotary_emb.inv_freq")}


def _take(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


# =========================================================================== docs/p-mod.md, "Image layouts"


class ImagePreprocessor:
    """CLIP preprocessing plus LLaVA's pad and AnyRes layouts, in PIL and numpy."""

    def __init__(self, processor_config: dict[str, Any], tile: int):
        self.tile = tile
        size = processor_config.get("size", tile)
        self.shortest_edge = size["shortest_edge"] if isinstance(size, dict) else int(size)
        crop = processor_config.get("crop_size", self.shortest_edge)
        self.crop = (crop["height"], crop["width"]) if isinstance(crop, dict) else (int(crop), int(crop))
        self.mean = tuple(processor_config.get("image_mean", OPENAI_CLIP_MEAN))
        self.std = tuple(processor_config.get("image_std", OPENAI_CLIP_STD))
        self.rescale = float(processor_config.get("rescale_factor", 1 / 255))

    def clip(self, image: Image.Image) -> torch.Tensor:
        """Resize the shortest edge (bicubic), centre crop, rescale, normalise: [3, H, W] float32."""
        width, height = image.size
        if width <= height:
            new_w, new_h = self.shortest_edge, int(self.shortest_edge * height / width)
        else:
            new_w, new_h = int(self.shortest_edge * width / height), self.shortest_edge
        if (new_w, new_h) != image.size:
            image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        pixels = np.asarray(image, dtype=np.uint8)
        crop_h, crop_w = self.crop
        top, left = (new_h - crop_h) // 2, (new_w - crop_w) // 2
        pixels = pixels[top:top + crop_h, left:left + crop_w]
        scaled = (pixels.astype(np.float64) * self.rescale).astype(np.float32)
        normed = (scaled - np.array(self.mean, dtype=np.float32)) / np.array(self.std, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(normed.transpose(2, 0, 1)))

    def pad(self, image: Image.Image) -> torch.Tensor:
        """Expand to a square on a canvas of round-down(mean*255), centred; then CLIP: [1, 3, H, W]."""
        width, height = image.size
        if width != height:
            side = max(width, height)
            canvas = Image.new(image.mode, (side, side), tuple(int(m * 255) for m in self.mean))
            canvas.paste(image, ((side - width) // 2, (side - height) // 2))
            image = canvas
        return self.clip(image)[None]

    @staticmethod
    def best_resolution(width: int, height: int, pinpoints: list[list[int]]) -> tuple[int, int]:
        best, best_effective, best_waste = None, -1, math.inf
        for target_w, target_h in pinpoints:
            scale = min(target_w / width, target_h / height)
            effective = min(int(width * scale) * int(height * scale), width * height)
            waste = target_w * target_h - effective
            if effective > best_effective or (effective == best_effective and waste < best_waste):
                best, best_effective, best_waste = (target_w, target_h), effective, waste
        return best

    def anyres(self, image: Image.Image, pinpoints: list[list[int]]) -> tuple[torch.Tensor, tuple[int, int]]:
        """Base image + row-major tiles of the letterboxed best resolution: ([1 + tiles, 3, H, W], grid)."""
        width, height = image.size
        target_w, target_h = self.best_resolution(width, height, pinpoints)
        scale_w, scale_h = target_w / width, target_h / height
        if scale_w < scale_h:
            new_w, new_h = target_w, min(math.ceil(height * scale_w), target_h)
        else:
            new_w, new_h = min(math.ceil(width * scale_h), target_w), target_h
        letterbox = Image.new("RGB", (target_w, target_h), (0, 0, 0))
        letterbox.paste(image.resize((new_w, new_h), Image.Resampling.BICUBIC),
                        ((target_w - new_w) // 2, (target_h - new_h) // 2))
        tiles = [
            letterbox.crop((left, top, left + self.tile, top + self.tile))
            for top in range(0, target_h, self.tile)
            for left in range(0, target_w, self.tile)
        ]
        base = image.resize((self.shortest_edge, self.shortest_edge), Image.Resampling.BICUBIC)
        pixels = torch.stack([self.clip(view) for view in [base, *tiles]])
        return pixels, (target_h // self.tile, target_w // self.tile)


# =========================================================================== docs/p-mod.md, "Prompts"


class SlowLlamaTokenizer:
    """What the released code's slow LlamaTokenizer (legacy) does with a piece of text: split at the
    special tokens, encode every other chunk with SentencePiece (its own dummy prefix each)."""

    def __init__(self, model_file: Path):
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.bos_id = self.sp.bos_id()
        self.specials = {piece: self.sp.piece_to_id(piece) for piece in ("<s>", "</s>", "<unk>")}
        self._split = re.compile("(" + "|".join(re.escape(p) for p in self.specials) + ")")

    def encode(self, text: str, add_bos: bool) -> list[int]:
        ids = [self.bos_id] if add_bos else []
        for chunk in self._split.split(text):
            if chunk in self.specials:
                ids.append(self.specials[chunk])
            elif chunk:
                ids.extend(self.sp.encode(chunk))
        return ids

    def encode_prompt(self, prompt: str) -> list[list[int]]:
        """Token ids of the pieces between `<image>` markers; BOS on the first piece only."""
        return [self.encode(piece, add_bos=(i == 0)) for i, piece in enumerate(prompt.split(IMAGE_MARKER))]


# =========================================================================== the model


class KeptTokenCache:
    """A per-layer KV cache; a p-MoD layer only ever appends its kept tokens to it."""

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        if layer_idx in self.keys:
            key = torch.cat([self.keys[layer_idx], key], dim=-2)
            value = torch.cat([self.values[layer_idx], value], dim=-2)
        self.keys[layer_idx], self.values[layer_idx] = key, value
        return key, value

    def slots(self) -> list[int]:
        return [self.keys[i].shape[-2] for i in sorted(self.keys)]


class IndependentPmod:
    """p-MoD LLaVA inference from a checkpoint directory in the released layout (docs/p-mod.md, "The released checkpoint layout"), float32."""

    def __init__(self, checkpoint_dir: str | Path):
        self.root = Path(checkpoint_dir)
        self.config = json.loads((self.root / "config.json").read_text())
        cfg = self.config
        weights = read_checkpoint_weights(self.root)
        self.tokenizer = SlowLlamaTokenizer(self.root / "tokenizer.model")

        # ---- vision tower + projector
        tower = cfg["mm_vision_tower"]
        tower_dir = Path(tower) if Path(tower).is_absolute() else self.root / tower
        if (tower_dir / "config.json").exists():
            vision_dict = json.loads((tower_dir / "config.json").read_text())
            vision_dict = vision_dict.get("vision_config", vision_dict)
            processor_file = tower_dir / "preprocessor_config.json"
            processor = json.loads(processor_file.read_text()) if processor_file.exists() else {}
        elif tower == "openai/clip-vit-large-patch14-336":
            vision_dict, processor = dict(CLIP_L_336), {}
        else:
            raise FileNotFoundError(f"vision tower {tower!r} not found")
        keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                "patch_size", "hidden_act", "layer_norm_eps", "num_channels")
        vision_config = CLIPVisionConfig(**{k: vision_dict[k] for k in keys if k in vision_dict})
        vision_config._attn_implementation = "eager"
        self.vision = CLIPVisionModel(vision_config).eval()
        self.vision.load_state_dict(_take(weights, VISION_PREFIX), strict=True)  # transformers 5 names
        self.patches_per_side = vision_config.image_size // vision_config.patch_size
        self.images = ImagePreprocessor(processor, vision_config.image_size)

        hidden = cfg["hidden_size"]
        self.projector = nn.Sequential(nn.Linear(cfg["mm_hidden_size"], hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.projector.load_state_dict(_take(weights, "model.mm_projector."))
        self.image_newline = weights.get("model.image_newline")

        # ---- language model, from transformers' LLaMA pieces
        text_config = LlamaConfig(
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
            rms_norm_eps=cfg["rms_norm_eps"],
            max_position_embeddings=cfg["max_position_embeddings"],
            rope_parameters={"rope_type": "default", "rope_theta": float(cfg.get("rope_theta", 10000.0))},
            hidden_act=cfg.get("hidden_act", "silu"),
        )
        text_config._attn_implementation = "eager"
        self.schedule = prd_schedule(cfg)
        self.norm_kind, self.norm_scale, self.norm_bias = parse_weight_norm(cfg.get("mod_weight_norm", "tanh_0.2_1"))
        self.token_type = cfg.get("mod_target_token_type", "vision_all")
        self.embed = nn.Embedding(cfg["vocab_size"], hidden)
        self.embed.weight.data.copy_(weights["model.embed_tokens.weight"])
        self.layers = nn.ModuleList()
        self.routers: dict[int, nn.Linear] = {}
        for i in range(cfg["num_hidden_layers"]):
            layer = LlamaDecoderLayer(text_config, layer_idx=i).eval()
            if i in self.schedule:
                layer.load_state_dict(_take(weights, f"model.layers.{i}.decoder_layer."))
                router = nn.Linear(hidden, 1, bias=bool(cfg.get("mod_bias_enabled", True)))
                router.load_state_dict(_take(weights, f"model.layers.{i}.router.router."))
                self.routers[i] = router
            else:
                layer.load_state_dict(_take(weights, f"model.layers.{i}."))
            self.layers.append(layer)
        self.norm = LlamaRMSNorm(hidden, eps=cfg["rms_norm_eps"])
        self.norm.weight.data.copy_(weights["model.norm.weight"])
        self.lm_head = nn.Linear(hidden, cfg["vocab_size"], bias=False)
        self.lm_head.weight.data.copy_(weights["lm_head.weight"])
        self.rotary = LlamaRotaryEmbedding(text_config)
        self.calibrating_routers = False

    # ------------------------------------------------------------------ vision features

    def _features(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.vision(pixel_values=pixels, output_hidden_states=True)
        selected = out.hidden_states[self.config["mm_vision_select_layer"]]
        if self.config.get("mm_vision_select_feature", "patch") == "patch":
            selected = selected[:, 1:]
        return self.projector(selected)

    def image_tokens(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        """(visual token embeddings [n, hidden], target mask [n]) of one image."""
        image = image.convert("RGB")
        if self.config["image_aspect_ratio"] == "pad":
            features = self._features(self.images.pad(image))[0]
            return features, torch.ones(len(features), dtype=torch.bool)
        pixels, (rows, cols) = self.images.anyres(image, self.config["image_grid_pinpoints"])
        features = self._features(pixels)
        side = self.patches_per_side
        base, tiles = features[0], features[1:]
        grid = tiles.view(rows, cols, side, side, -1).permute(0, 2, 1, 3, 4).reshape(rows * side, cols * side, -1)
        width, height = image.size
        current_h, current_w = grid.shape[:2]
        if width / height > current_w / current_h:
            trim = (current_h - int(height * (current_w / width))) // 2
            grid = grid[trim:current_h - trim]
        else:
            trim = (current_w - int(width * (current_h / height))) // 2
            grid = grid[:, trim:current_w - trim]
        max_patches = self.config.get("max_num_patches")
        if max_patches is not None:
            h, w = grid.shape[:2]
            times = math.sqrt(h * w / (max_patches * side * side))
            if times > 1.01:
                grid = nn.functional.interpolate(grid.permute(2, 0, 1)[None], [int(h // times), int(w // times)],
                                                 mode="bilinear")[0].permute(1, 2, 0)
        h = grid.shape[0]
        grid = torch.cat([grid, self.image_newline.view(1, 1, -1).expand(h, 1, -1)], dim=1)
        high_res = grid.reshape(-1, grid.shape[-1])
        mask = torch.cat([torch.full((len(base),), self.token_type != "vision_hr"),
                          torch.ones(len(high_res), dtype=torch.bool)])
        return torch.cat([base, high_res]), mask

    # ------------------------------------------------------------------ language model

    def _attend_and_mlp(self, i: int, x: torch.Tensor, positions: torch.Tensor, cache: KeptTokenCache,
                        causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """h = x + Attn(LN1(x)), m = MLP(LN2(h)) for the given tokens (appended to layer i's cache)."""
        layer = self.layers[i]
        n = x.shape[1]
        mask = torch.full((n, n), float("-inf")).triu(1)[None, None] if causal and n > 1 else None
        attn, _ = layer.self_attn(
            hidden_states=layer.input_layernorm(x),
            position_embeddings=self.rotary(x, positions[None]),
            attention_mask=mask,
            past_key_values=cache,
        )
        h = x + attn
        return h, layer.mlp(layer.post_attention_layernorm(h))

    def _weights(self, logits: torch.Tensor) -> torch.Tensor:
        if self.norm_kind == "tanh":
            normed = torch.tanh(logits)
        elif self.norm_kind == "sigmoid":
            normed = torch.sigmoid(logits)
        elif self.norm_kind == "softmax":
            normed = torch.softmax(logits, dim=-1)
        else:
            normed = logits
        return normed * self.norm_scale + self.norm_bias

    def _pmod_layer(self, i: int, x: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor,
                    cache: KeptTokenCache, trace: dict | None) -> torch.Tensor:
        tokens = x[0]
        logits = self.routers[i](tokens)[:, 0]
        if self.calibrating_routers:  # make_foreign_checkpoint: standardise this router on this prompt
            router, scale = self.routers[i], 1.0 / float(logits[targets].std())
            router.weight.data.mul_(scale)
            router.bias.data.copy_((router.bias.data - logits[targets].mean()) * scale)
            logits = router(tokens)[:, 0]
        logits = logits.masked_fill(~targets, float("-inf"))  # non-targets are never chosen over targets
        weight = self._weights(logits)
        num_targets = targets.sum().int()
        keep = int(torch.trunc(num_targets * self.schedule[i]).int())  # int32 * float: float32, as released
        chosen = torch.zeros_like(targets)
        chosen[torch.topk(weight, keep, sorted=True).indices] = True
        kept = chosen | ~targets
        h, m = self._attend_and_mlp(i, tokens[kept][None], positions[kept], cache, causal=True)
        h, m = h[0], m[0]
        # STRing: skipped targets w * x, kept targets h + w * m, kept non-targets h + m.
        out = weight[:, None] * tokens
        out[kept] = h + torch.where(targets[kept][:, None], weight[kept][:, None] * m, m)
        if trace is not None:
            trace[i] = {"router_logits": logits[targets].detach(), "kept": kept.nonzero()[:, 0].tolist()}
        return out[None]

    @torch.no_grad()
    def prefill(self, prompt: str, images: list[Image.Image], trace: dict | None = None):
        """Run the prompt; returns (logits of its last token, cache, prompt length)."""
        pieces = self.tokenizer.encode_prompt(prompt)
        if len(pieces) - 1 != len(images):
            raise ValueError(f"prompt has {len(pieces) - 1} {IMAGE_MARKER} markers but {len(images)} images")
        embeds, targets = [], []
        for number, ids in enumerate(pieces):
            embeds.append(self.embed(torch.tensor(ids, dtype=torch.long)))
            targets.append(torch.full((len(ids),), self.token_type == "all"))
            if number < len(images):
                visual, mask = self.image_tokens(images[number])
                embeds.append(visual)
                targets.append(mask)
        x = torch.cat(embeds)[None]
        targets = torch.cat(targets)
        positions = torch.arange(x.shape[1])
        routed = bool(images) and bool(targets.any())  # a text-only sequence runs dense
        cache = KeptTokenCache()
        for i in range(len(self.layers)):
            if routed and i in self.schedule:
                x = self._pmod_layer(i, x, positions, targets, cache, trace)
            else:
                h, m = self._attend_and_mlp(i, x, positions, cache, causal=True)
                x = h + m
        if trace is not None:
            trace["num_prompt_tokens"] = x.shape[1]
            trace["num_targets"] = int(targets.sum()) if routed else 0
        return self.lm_head(self.norm(x[:, -1])), cache, x.shape[1]

    @torch.no_grad()
    def generate(self, prompt: str, images: list[Image.Image], max_new_tokens: int,
                 trace: dict | None = None) -> list[int]:
        """Greedy decoding; stops after EOS (id 2, included) or `max_new_tokens` tokens."""
        logits, cache, position = self.prefill(prompt, images, trace)
        generated: list[int] = []
        while True:
            token = int(torch.argmax(logits[0]))
            generated.append(token)
            if token == EOS_ID or len(generated) >= max_new_tokens:
                break
            # Tokens after the prompt are never targets: every layer runs in full on them.
            x = self.embed(torch.tensor([[token]]))
            positions = torch.tensor([position])
            for i in range(len(self.layers)):
                h, m = self._attend_and_mlp(i, x, positions, cache, causal=False)
                x = h + m
            logits = self.lm_head(self.norm(x[:, -1]))
            position += 1
        if trace is not None:
            trace["kv_slots"] = cache.slots()
        return generated


# =========================================================================== test inputs


def vicuna_prompt(question: str, num_images: int) -> str:
    """The released single-turn vicuna_v1 prompt, one "<image>\n" per image before the question."""
    images = "<image>\n" * num_images
    return f"{_SYSTEM} USER: {images}{question} ASSISTANT:"


def sample_image(width: int, height: int, seed: int) -> Image.Image:
    """A deterministic image with structure (gradients) and texture (noise): no two patches are
    equal, so router logits have no exact ties."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * (200 / width) + 20 * np.sin(y / (7 + seed)),
                     y * (200 / height) + 20 * np.cos(x / (5 + seed)),
                     (x + y) * (100 / (width + height)) + 40 * seed % 120], axis=-1)
    return Image.fromarray((base + rng.integers(0, 56, (height, width, 3))).clip(0, 255).astype(np.uint8))


# =========================================================================== foreign checkpoints

_FOREIGN_WORDS = (
    "photo shows cat dog tree road car house sky blue red green yellow people man woman child sits stands "
    "holds walks near under over inside outside bright dark large small round square window door table "
    "what where how many is are there this that the a an of in on with and to image describe answer"
).split()
_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
           "helpful, detailed, and polite answers to the user's questions.")


def _foreign_tokenizer(seed: int, vocab_size: int = 512) -> bytes:
    rng = random.Random(1000 + seed)
    lines = []
    for _ in range(1500):
        words = " ".join(rng.choice(_FOREIGN_WORDS) for _ in range(rng.randint(2, 12)))
        lines.append(f"{_SYSTEM} USER: {words}? ASSISTANT: {words.capitalize()}. {rng.randint(0, 9999)}")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, add_dummy_prefix=True, remove_extra_whitespaces=False, split_digits=True,
        normalization_rule_name="identity", character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, minloglevel=2,
    )
    return model.getvalue()


def _liven_(module: nn.Module, generator: torch.Generator) -> None:
    """transformers' init (std 0.02) leaves a 64-wide model nearly input-independent: redraw every
    matrix at 1/sqrt(fan_in) (sharper attention, damped residual branches) and jitter the norms,
    so that generations depend on the image."""
    gains = {"q_proj": 1.8, "k_proj": 1.8, "o_proj": 0.35, "down_proj": 0.35}
    for name, param in module.named_parameters():
        leaf = name.rsplit(".", 2)[-2] if "." in name else name
        if param.dim() == 2 and "embed" not in name:
            std = gains.get(leaf, 1.0) / math.sqrt(param.shape[1])
            param.data.normal_(0.0, std, generator=generator)
        elif param.dim() == 2:
            param.data.normal_(0.0, 0.8, generator=generator)
        elif name.endswith("weight") and "norm" in name:
            param.data.add_(torch.randn(param.shape, generator=generator) * 0.08)


_FOREIGN_MARKER = ".foreign_checkpoint.json"
_FOREIGN_VERSION = 1


def make_foreign_checkpoint(out_dir: str | Path, variant: str = "next", seed: int = 0) -> Path:
    """A p-MoD checkpoint in the released layout built from transformers models (not model_registry).

    Reused when `out_dir` already holds one built with the same arguments.
    """
    out = Path(out_dir)
    marker = {"version": _FOREIGN_VERSION, "variant": variant, "seed": seed}
    if (out / _FOREIGN_MARKER).exists() and json.loads((out / _FOREIGN_MARKER).read_text()) == marker:
        return out
    (out / "clip_tower").mkdir(parents=True, exist_ok=True)
    tokenizer_model = _foreign_tokenizer(seed)
    vocab = spm.SentencePieceProcessor(model_proto=tokenizer_model).get_piece_size()
    hidden, layers = 64, 32
    config: dict[str, Any] = {
        "_name_or_path": "lmsys/vicuna-7b-v1.5",
        "architectures": ["PmodLlavaLlamaForCausalLM"],
        "model_type": "pmod_llava_llama",
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
        "pad_token_id": 0, "hidden_act": "silu", "hidden_size": hidden, "initializer_range": 0.02,
        "intermediate_size": 128, "max_position_embeddings": 4096, "num_attention_heads": 2,
        "num_hidden_layers": layers, "num_key_value_heads": 2, "pretraining_tp": 1, "rms_norm_eps": 1e-5,
        "rope_scaling": None, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "float32",
        "transformers_version": "4.37.2", "use_cache": True, "vocab_size": vocab,
        "mm_vision_tower": "./clip_tower", "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": 48,
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False, "mm_projector_lr": None, "mm_vision_tower_lr": None,
        "use_mm_proj": True, "tune_mm_mlp_adapter": False, "freeze_mm_mlp_adapter": False,
        "unfreeze_mm_vision_tower": True, "max_num_patches": None,
        "tokenizer_model_max_length": 4096 if variant == "next" else 2048, "tokenizer_padding_side": "right",
        "mod_target_layers": "shiftedcos_decay_0.85_0.15", "mod_target_token_type": "vision_all",
        "mod_router_factor": 0.5, "mod_weight_norm": "tanh_0.2_1", "mod_bias_enabled": True,
        "mod_special_init": True,
    }
    if variant == "next":
        config.update(image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad",
                      image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])
    else:
        config.update(image_aspect_ratio="pad", mm_patch_merge_type="flat", image_grid_pinpoints=None)
    schedule = prd_schedule(config)
    config["mod_target_layer_indices"] = sorted(schedule)

    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        llama = LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=128, num_hidden_layers=layers,
            num_attention_heads=2, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=4096,
        ))
        vision_config = CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=3, image_size=336, patch_size=14,
                                         hidden_act="quick_gelu", projection_dim=48)
        clip = CLIPVisionModel(vision_config)
        projector = nn.Sequential(nn.Linear(48, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        routers = {i: nn.Linear(hidden, 1) for i in schedule}
    _liven_(llama, generator)
    _liven_(projector, generator)
    _liven_(clip.encoder, generator)

    state: dict[str, torch.Tensor] = {}
    head_dim = hidden // 2
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    for name, tensor in llama.state_dict().items():
        match = re.match(r"model\.layers\.(\d+)\.(.*)", name)
        if match and int(match.group(1)) in schedule:
            name = f"model.layers.{match.group(1)}.decoder_layer.{match.group(2)}"
        state[name] = tensor
    for i in range(layers):  # the stale buffer transformers 4.31 saved in every layer
        prefix = f"model.layers.{i}.decoder_layer." if i in schedule else f"model.layers.{i}."
        state[prefix + "self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    for i, router in routers.items():
        state[f"model.layers.{i}.router.router.weight"] = router.weight.data
        state[f"model.layers.{i}.router.router.bias"] = router.bias.data
    for name, tensor in projector.state_dict().items():
        state[f"model.mm_projector.{name}"] = tensor
    if variant == "next":
        state["model.image_newline"] = torch.randn(hidden, generator=generator)
    for name, tensor in clip.state_dict().items():  # transformers 5 drops the vision_model. prefix
        state[VISION_PREFIX + name] = tensor

    (out / "clip_tower" / "config.json").write_text(json.dumps({
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 48,
        "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                        "num_hidden_layers": 2, "vocab_size": 512, "projection_dim": 48},
        "vision_config": {k: getattr(vision_config, k) for k in (
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
            "patch_size", "hidden_act", "layer_norm_eps", "projection_dim", "num_channels")},
    }, indent=2))
    # openai's own (legacy) preprocessor_config.json format.
    (out / "clip_tower" / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": 336, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD), "resample": 3, "size": 336,
    }, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2,
                                                            "pad_token_id": 0}))
    (out / "tokenizer.model").write_bytes(tokenizer_model)
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": True,
        "model_max_length": config["tokenizer_model_max_length"], "padding_side": "right",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
    }, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                             "unk_token": "<unk>"}))
    _save_bin_shards(out, state, num_shards=3)
    _calibrate_routers(out, generator)
    (out / _FOREIGN_MARKER).write_text(json.dumps(marker))
    return out


def _save_bin_shards(out: Path, state: dict[str, torch.Tensor], num_shards: int) -> None:
    names = sorted(state)
    per_shard = math.ceil(len(names) / num_shards)
    weight_map = {}
    for number in range(num_shards):
        file_name = f"pytorch_model-{number + 1:05d}-of-{num_shards:05d}.bin"
        chunk = names[number * per_shard:(number + 1) * per_shard]
        torch.save({n: state[n].detach().clone().contiguous() for n in chunk}, str(out / file_name))
        weight_map.update(dict.fromkeys(chunk, file_name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (out / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def _calibrate_routers(out: Path, generator: torch.Generator) -> None:
    """Scale each router so its logits over a calibration image's visual tokens have mean 0 and
    standard deviation 1: tanh then spreads over (-1, 1) and the top-k depends on the image."""
    model = IndependentPmod(out)
    pixels = torch.rand((300, 400, 3), generator=generator).mul(255).to(torch.uint8).numpy()
    model.calibrating_routers = True  # layer by layer within one prefill: routing shapes later inputs
    model.prefill("USER: <image>\nWhat is this? ASSISTANT:", [Image.fromarray(pixels)])
    files = json.loads((out / "pytorch_model.bin.index.json").read_text())["weight_map"]
    shards = {name: torch.load(str(out / name), weights_only=True) for name in sorted(set(files.values()))}
    for i, router in model.routers.items():
        for part in ("weight", "bias"):
            name = f"model.layers.{i}.router.router.{part}"
            shards[files[name]][name] = getattr(router, part).data.clone()
    for file_name, tensors in shards.items():
        torch.save(tensors, str(out / file_name))
