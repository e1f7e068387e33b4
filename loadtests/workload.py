"""Requests to send: image-chat conversations as vLLM benchmark `SampleRequest`s.

Two datasets:

- `image-chat` (default, `ImageChatDataset`): a chat-style question about 1..n images, with an
  optional text context so the text part has roughly `input_len` tokens. Images are either
  generated (structured content: gradients, shapes and mild noise, so they compress like
  pictures rather than like white noise) at a weighted mix of sizes, or sampled from a folder.
  Each image is sent as an OpenAI `image_url` content part holding a base64 `data:` URL
  (PNG or JPEG), images before the text, as LLaVA prompts have them. No tokenizer is needed:
  the server's `usage` reports the real prompt length (text + image tokens).
- `random-mm`: vLLM's own `RandomMultiModalDataset` (what `vllm bench serve --dataset-name
  random-mm` sends: random-token prompts of exact length and random-pixel JPEGs); needs
  `--tokenizer`. Useful to reproduce `vllm bench serve` numbers.

Both are deterministic in the seed, so a p-MoD server and a baseline get identical requests.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from vllm.benchmarks.datasets import BenchmarkDataset, RandomMultiModalDataset, SampleRequest

from loadtests import DEFAULT_IMAGE_SIZES

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
# ~1.3 tokens per English word for LLaMA-family tokenizers; only used to size the text context.
TOKENS_PER_WORD = 1.3

QUESTIONS = (
    "Describe this image in detail.",
    "What is happening in this picture?",
    "What objects can you see, and where are they placed relative to each other?",
    "What colors dominate this image, and what mood do they create?",
    "Is there any text in the image? If so, what does it say?",
    "Write a short caption for this image suitable for a news article.",
    "Count the distinct shapes in the picture and describe each one.",
    "What might have happened just before this picture was taken?",
    "Explain this image to someone who cannot see it.",
    "Which part of the image draws the eye first, and why?",
    "Is this a photograph, a drawing or a computer rendering? Explain your reasoning.",
    "Suggest three titles for this image.",
    "What is unusual or surprising about this image?",
    "Describe the background and the foreground separately.",
    "If this image were an advertisement, what product could it be selling?",
    "What time of day does this scene suggest, and what clues support that?",
    "List every rectangle and circle you can find, with their approximate positions.",
    "Compare the left half and the right half of the image.",
    "Write a haiku inspired by this picture.",
    "What would you change to make this image more balanced?",
)
MULTI_IMAGE_QUESTIONS = (
    "What are the differences between these images?",
    "Which of these images is brighter, and why?",
    "Describe what the images have in common.",
    "Put these images in an order that tells a story, and explain it.",
)
WORDS = (
    "the a of and to in is for on with as by at from this that we our it be are was image picture "
    "photo scene color light shadow left right top bottom center background foreground shape circle "
    "square line pattern texture detail object person street building tree sky water road car window "
    "door table chair wall floor room city park garden morning evening night bright dark warm cool "
    "red green blue yellow orange purple gray white black small large wide narrow near far above below "
    "behind beside between around across along report customer product camera inspection document "
    "quality review question answer describe explain compare notice include show suggest consider "
    "previous next first second last several many few some every each other another similar different"
).split()


@dataclass(frozen=True)
class ImageSize:
    width: int
    height: int
    weight: float = 1.0


def parse_image_sizes(spec: str) -> list[ImageSize]:
    """`"336x336:0.5,672x672:0.3,1024x768"` (width x height [: weight]) -> sizes."""
    sizes = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        dims, _, weight = part.partition(":")
        try:
            w, h = (int(x) for x in dims.lower().split("x"))
            size = ImageSize(w, h, float(weight) if weight else 1.0)
        except ValueError:
            raise ValueError(f"bad image size {part!r}: expected WIDTHxHEIGHT[:WEIGHT]") from None
        if size.width < 1 or size.height < 1 or size.weight < 0 or size.width * size.height > 8192 * 8192:
            raise ValueError(f"bad image size {part!r}")
        sizes.append(size)
    if not sizes or sum(s.weight for s in sizes) <= 0:
        raise ValueError(f"no usable image size in {spec!r}")
    return sizes


def parse_count_range(spec: str | int) -> tuple[int, int]:
    """`"2"` -> (2, 2); `"0-3"` -> (0, 3)."""
    text = str(spec).strip()
    lo, sep, hi = text.partition("-")
    try:
        low, high = (int(lo), int(hi)) if sep else (int(lo), int(lo))
    except ValueError:
        raise ValueError(f"bad count {spec!r}: expected N or MIN-MAX") from None
    if low < 0 or high < low:
        raise ValueError(f"bad count {spec!r}")
    return low, high


def synth_image(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """A picture-like image: a two-colour gradient, a few filled shapes and mild noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    t = x * math.cos(angle) + y * math.sin(angle)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    base = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 9))):
        x0, x1 = sorted(rng.integers(0, width, 2).tolist())
        y0, y1 = sorted(rng.integers(0, height, 2).tolist())
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            draw.rectangle((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)), fill=colour)
        elif kind == 1:
            draw.ellipse((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)), fill=colour)
        else:
            points = [
                (int(px), int(py))
                for px, py in zip(rng.integers(0, width, 3), rng.integers(0, height, 3), strict=True)
            ]
            draw.polygon(points, fill=colour)
    pixels = np.asarray(image).astype(np.int16) + rng.normal(0, 6, (height, width, 1)).astype(np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def encode_image(image: Image.Image, fmt: str) -> tuple[bytes, str]:
    """(encoded bytes, mime type) in PNG or JPEG."""
    fmt = fmt.lower()
    buffer = io.BytesIO()
    if fmt in ("jpeg", "jpg"):
        image.convert("RGB").save(buffer, format="JPEG", quality=90)
        return buffer.getvalue(), "image/jpeg"
    if fmt == "png":
        image.save(buffer, format="PNG")
        return buffer.getvalue(), "image/png"
    raise ValueError(f"unsupported image format {fmt!r}: expected png or jpeg")


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def image_part(data: bytes, mime: str) -> dict[str, Any]:
    """An OpenAI chat `image_url` content part."""
    return {"type": "image_url", "image_url": {"url": data_url(data, mime)}}


class ImageSource:
    """Images for requests: generated at a weighted size mix, or sampled from a folder."""

    def __init__(
        self,
        *,
        sizes: list[ImageSize] | None = None,
        image_dir: str | Path | None = None,
        image_format: str = "jpeg",
        reuse: str = "perturb",
    ) -> None:
        if reuse not in ("perturb", "exact"):
            raise ValueError("image reuse must be 'perturb' or 'exact'")
        encode_image(Image.new("RGB", (1, 1)), image_format)  # validates the format
        self.image_format = image_format
        self.reuse = reuse
        self.sizes = sizes or parse_image_sizes(DEFAULT_IMAGE_SIZES)
        self.files: list[Path] = []
        if image_dir is not None:
            root = Path(image_dir)
            if not root.is_dir():
                raise ValueError(f"--image-dir {root} is not a directory")
            self.files = sorted(
                p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not self.files:
                raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
        weights = np.array([s.weight for s in self.sizes], dtype=float)
        self._probs = weights / weights.sum()

    def describe(self) -> dict[str, Any]:
        if self.files:
            return {"source": "folder", "files": len(self.files), "reuse": self.reuse}
        return {
            "source": "generated",
            "format": self.image_format,
            "sizes": {
                f"{s.width}x{s.height}": round(float(p), 4)
                for s, p in zip(self.sizes, self._probs, strict=True)
            },
        }

    def make(self, rng: np.random.Generator, tag: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """(content part, info) for one image; `tag` makes folder images unique when perturbed."""
        if self.files:
            path = self.files[int(rng.integers(0, len(self.files)))]
            raw = path.read_bytes()
            with Image.open(io.BytesIO(raw)) as opened:
                fmt = (opened.format or "").lower()
                width, height = opened.size
                if self.reuse == "exact" and fmt in ("png", "jpeg"):
                    data, mime = raw, f"image/{fmt}"
                else:
                    image = opened.convert("RGB")
                    if self.reuse == "perturb":
                        # A 16x16 corner patch of noise seeded by the request tag: a different
                        # image (also after JPEG) for the server's multimodal / prefix caches, so
                        # a small folder does not turn into cache hits.
                        side = min(16, width, height)
                        noise = np.random.default_rng(tag).integers(0, 256, (side, side, 3), dtype=np.uint8)
                        image.paste(Image.fromarray(noise), (0, 0))
                    data, mime = encode_image(image, fmt if fmt in ("png", "jpeg") else self.image_format)
            info = {"width": width, "height": height, "bytes": len(data), "file": path.name}
        else:
            size = self.sizes[int(rng.choice(len(self.sizes), p=self._probs))]
            data, mime = encode_image(synth_image(size.width, size.height, rng), self.image_format)
            info = {"width": size.width, "height": size.height, "bytes": len(data)}
        return image_part(data, mime), info


def estimate_tokens(text: str) -> int:
    return max(1, round(len(text.split()) * TOKENS_PER_WORD))


def sample_lengths(
    rng: np.random.Generator, n: int, mean: int, range_ratio: float, minimum: int
) -> np.ndarray:
    """Integer-uniform lengths in [mean*(1-r), mean*(1+r)], as `vllm bench serve`'s random datasets."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError("range ratio must be in [0, 1)")
    low = max(minimum, math.floor(mean * (1 - range_ratio)))
    high = max(low, math.ceil(mean * (1 + range_ratio)))
    return rng.integers(low, high + 1, size=n)


class ImageChatDataset(BenchmarkDataset):
    """Image-chat requests (see the module docstring). `sample` needs no tokenizer."""

    IS_MULTIMODAL = True

    def __init__(self, images: ImageSource, system_prompt: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.images = images
        self.system_prompt = system_prompt
        self.info: dict[str, dict[str, Any]] = {}  # request_id -> images sent, text length estimate

    def _text(self, rng: np.random.Generator, target_tokens: int, num_images: int) -> str:
        questions = MULTI_IMAGE_QUESTIONS if num_images > 1 else QUESTIONS
        question = questions[int(rng.integers(0, len(questions)))]
        missing = target_tokens - estimate_tokens(question)
        if missing < 8:
            return question
        words = [
            WORDS[int(i)]
            for i in rng.integers(0, len(WORDS), size=max(1, int(missing / TOKENS_PER_WORD) - 2))
        ]
        sentences, start = [], 0
        while start < len(words):  # sentences of 8..16 words
            end = start + int(rng.integers(8, 17))
            sentences.append(" ".join(words[start:end]).capitalize() + ".")
            start = end
        return "Context: " + " ".join(sentences) + "\n\n" + question

    def sample(
        self,
        tokenizer: Any = None,
        num_requests: int = 1,
        request_id_prefix: str = "",
        no_oversample: bool = False,
        input_len: int = 64,
        output_len: int = 128,
        range_ratio: float = 0.0,
        images_per_request: tuple[int, int] = (1, 1),
        **kwargs: Any,
    ) -> list[SampleRequest]:
        rng = np.random.default_rng(self.random_seed)
        input_lens = sample_lengths(rng, num_requests, input_len, range_ratio, minimum=1)
        output_lens = sample_lengths(rng, num_requests, output_len, range_ratio, minimum=1)
        requests = []
        for i in range(num_requests):
            request_id = f"{request_id_prefix}{i}"
            num_images = int(rng.integers(images_per_request[0], images_per_request[1] + 1))
            parts, infos = [], []
            for j in range(num_images):
                part, info = self.images.make(rng, tag=(self.random_seed * 1_000_003 + i) * 17 + j)
                parts.append(part)
                infos.append(info)
            text = self._text(rng, int(input_lens[i]), num_images)
            messages: list[dict[str, Any]] = []
            if self.system_prompt:
                messages.append({"role": "system", "content": self.system_prompt})
            messages.append({"role": "user", "content": [*parts, {"type": "text", "text": text}]})
            prompt_len = estimate_tokens(text) + (
                estimate_tokens(self.system_prompt) if self.system_prompt else 0
            )
            self.info[request_id] = {"images": infos, "text_tokens_estimate": prompt_len}
            requests.append(
                SampleRequest(
                    prompt=text,
                    prompt_len=prompt_len,
                    expected_output_len=int(output_lens[i]),
                    request_id=request_id,
                    chat_messages=messages,
                )
            )
        return requests


@dataclass
class WorkloadSpec:
    dataset: str = "image-chat"
    num_requests: int = 100
    seed: int = 0
    input_len: int = 64
    output_len: int = 128
    range_ratio: float = 0.0
    images_per_request: tuple[int, int] = (1, 1)
    image_sizes: str = DEFAULT_IMAGE_SIZES
    image_dir: str | None = None
    image_format: str = "jpeg"
    image_reuse: str = "perturb"
    system_prompt: str | None = None
    tokenizer: str | None = None


def build_requests(
    spec: WorkloadSpec, num_requests: int, seed: int, request_id_prefix: str
) -> tuple[list[SampleRequest], dict[str, dict[str, Any]]]:
    """The requests of one phase, plus per-request info (images sent) keyed by request id."""
    if spec.dataset == "image-chat":
        source = ImageSource(
            sizes=parse_image_sizes(spec.image_sizes),
            image_dir=spec.image_dir,
            image_format=spec.image_format,
            reuse=spec.image_reuse,
        )
        dataset = ImageChatDataset(source, system_prompt=spec.system_prompt, random_seed=seed)
        requests = dataset.sample(
            num_requests=num_requests,
            request_id_prefix=request_id_prefix,
            input_len=spec.input_len,
            output_len=spec.output_len,
            range_ratio=spec.range_ratio,
            images_per_request=spec.images_per_request,
        )
        return requests, dataset.info
    if spec.dataset == "random-mm":
        return _random_mm(spec, num_requests, seed, request_id_prefix)
    raise ValueError(f"unknown dataset {spec.dataset!r}: expected image-chat or random-mm")


def _random_mm(
    spec: WorkloadSpec, num_requests: int, seed: int, request_id_prefix: str
) -> tuple[list[SampleRequest], dict[str, dict[str, Any]]]:
    """vLLM's RandomMultiModalDataset with our size mix and images-per-request range."""
    if not spec.tokenizer:
        raise ValueError("--dataset random-mm needs --tokenizer (a HF name or local path)")
    from vllm.tokenizers import get_tokenizer

    tokenizer = get_tokenizer(spec.tokenizer)
    low, high = spec.images_per_request
    base = (low + high) / 2
    ratio = (high - low) / (high + low) if high + low > 0 else 0.0
    bucket = {}
    for size in parse_image_sizes(spec.image_sizes):
        key = (size.height, size.width, 1)
        bucket[key] = bucket.get(key, 0.0) + size.weight
    dataset = RandomMultiModalDataset(random_seed=seed)
    requests = dataset.sample(
        tokenizer=tokenizer,
        num_requests=num_requests,
        request_id_prefix=request_id_prefix,
        input_len=spec.input_len,
        output_len=spec.output_len,
        range_ratio=spec.range_ratio,
        limit_mm_per_prompt={"image": max(high, 1)},
        base_items_per_request=max(1, round(base)) if high else 0,
        num_mm_items_range_ratio=min(ratio, 1.0),
        bucket_config=bucket,
    )
    info = {}
    for request in requests:
        images = []
        for part in request.multi_modal_data or []:
            url = part.get("image_url", {}).get("url", "")
            raw = base64.b64decode(url.split(",", 1)[1]) if url.startswith("data:") else b""
            if raw:
                with Image.open(io.BytesIO(raw)) as opened:
                    images.append({"width": opened.size[0], "height": opened.size[1], "bytes": len(raw)})
        info[request.request_id] = {"images": images, "text_tokens_estimate": request.prompt_len}
    return requests, info
