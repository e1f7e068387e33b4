"""A synthetic image-question task that needs the image: coloured shapes on a background.

Every example is generated from ``(seed, index)`` alone, so a training run, a held-out set and a
test see exactly the same pictures on any machine, and nothing is downloaded.

A picture (``IMAGE_SIZE`` pixels square) is split into four quadrants; 1 to 4 of them hold one
shape each (circle, square or triangle), in five colours, every colour at most once per picture.
Questions ask about colour, shape, count or position, and the answers are one or two words:

    What color is the triangle?          -> blue          (asked only when one triangle is there)
    What shape is the red object?        -> circle
    How many objects are there?          -> three
    How many squares are there?          -> zero
    Where is the green square?           -> top left
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image, ImageDraw

IMAGE_SIZE = 224  # rendered side; the checkpoint's preprocessing resizes it to its tile size

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 45, 45),
    "green": (45, 175, 65),
    "blue": (55, 95, 230),
    "yellow": (235, 215, 45),
    "purple": (160, 70, 205),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")  # quadrant order
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
QUESTION_TYPES = ("color", "shape", "count", "count_shape", "position")

# Every answer the task can ask for (the model's whole output vocabulary for this task).
ANSWERS = (*COLORS, *SHAPES, *NUMBER_WORDS, *POSITIONS)


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    color: str
    quadrant: int  # index into POSITIONS
    center: tuple[float, float]  # pixels
    size: float  # pixels: circle diameter, square side, triangle base/height


@dataclass(frozen=True)
class Example:
    image: Image.Image
    question: str
    answer: str
    kind: str  # one of QUESTION_TYPES
    objects: tuple[ShapeObject, ...]


def _background(rng: random.Random) -> tuple[int, int, int]:
    """A dark, desaturated background, so every shape colour stands out."""
    level = rng.randint(25, 85)
    return tuple(min(255, max(0, level + rng.randint(-15, 15))) for _ in range(3))  # type: ignore[return-value]


def draw_scene(objects: tuple[ShapeObject, ...], background: tuple[int, int, int],
               size: int = IMAGE_SIZE) -> Image.Image:
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        cx, cy, half = obj.center[0], obj.center[1], obj.size / 2
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=fill)
        elif obj.shape == "square":
            draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=fill)
        else:  # an upright isosceles triangle
            draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill)
    return image


def random_scene(rng: random.Random, size: int = IMAGE_SIZE) -> tuple[tuple[ShapeObject, ...], tuple[int, int, int]]:
    count = rng.randint(1, 4)
    quadrants = sorted(rng.sample(range(4), count))
    colors = rng.sample(list(COLORS), count)
    cell = size / 2
    objects = []
    for quadrant, color in zip(quadrants, colors):
        shape_size = rng.uniform(0.55, 0.8) * cell
        slack = (cell - shape_size) / 2 - 2
        row, col = divmod(quadrant, 2)
        center = (
            (col + 0.5) * cell + rng.uniform(-slack, slack),
            (row + 0.5) * cell + rng.uniform(-slack, slack),
        )
        objects.append(ShapeObject(rng.choice(SHAPES), color, quadrant, center, shape_size))
    return tuple(objects), _background(rng)


def _plural(shape: str) -> str:
    return shape + "s"


def ask(rng: random.Random, objects: tuple[ShapeObject, ...], kind: str) -> tuple[str, str]:
    """A question of ``kind`` about ``objects`` and its answer."""
    if kind == "color":
        unique = [o for o in objects if sum(p.shape == o.shape for p in objects) == 1]
        if not unique:  # every shape repeats: ask by position instead
            obj = rng.choice(objects)
            return f"What color is the object in the {POSITIONS[obj.quadrant]}?", obj.color
        obj = rng.choice(unique)
        return f"What color is the {obj.shape}?", obj.color
    if kind == "shape":
        obj = rng.choice(objects)
        return f"What shape is the {obj.color} object?", obj.shape
    if kind == "count":
        return "How many objects are there?", NUMBER_WORDS[len(objects)]
    if kind == "count_shape":
        shape = rng.choice(SHAPES)
        return f"How many {_plural(shape)} are there?", NUMBER_WORDS[sum(o.shape == shape for o in objects)]
    if kind == "position":
        obj = rng.choice(objects)
        return f"Where is the {obj.color} {obj.shape}?", POSITIONS[obj.quadrant]
    raise ValueError(f"unknown question type {kind!r}")


def example(seed: int, index: int, kind: str | None = None) -> Example:
    """The ``index``-th example of the stream ``seed`` (question types cycle, so any 5 consecutive
    examples cover all of them)."""
    rng = random.Random(f"pmod-shapes/{seed}/{index}")
    objects, background = random_scene(rng)
    kind = kind or QUESTION_TYPES[index % len(QUESTION_TYPES)]
    question, answer = ask(rng, objects, kind)
    return Example(draw_scene(objects, background), question, answer, kind, objects)


DESCRIBE = "Describe the image."


def describe(objects: tuple[ShapeObject, ...]) -> str:
    """Every object, in quadrant order: ``red circle top left, blue square bottom right``."""
    return ", ".join(f"{o.color} {o.shape} {POSITIONS[o.quadrant]}" for o in objects)


def conversation(seed: int, index: int) -> tuple[Image.Image, list[tuple[str, str]]]:
    """A training picture with a description and one question of every type, in a random order
    (LLaVA's multi-turn format: several questions about one image share its visual tokens)."""
    rng = random.Random(f"pmod-shapes-train/{seed}/{index}")
    objects, background = random_scene(rng)
    turns = [ask(rng, objects, kind) for kind in QUESTION_TYPES] + [(DESCRIBE, describe(objects))]
    rng.shuffle(turns)
    return draw_scene(objects, background), turns


def examples(seed: int, count: int, start: int = 0) -> Iterator[Example]:
    for index in range(start, start + count):
        yield example(seed, index)


# Disjoint streams: training never sees a held-out picture (different seeds give different RNGs).
TRAIN_SEED = 0
HELDOUT_SEED = 1_000_003
VALID_SEED = 2_000_003  # monitoring during training; the held-out set is only for the benchmark


def heldout(count: int, start: int = 0) -> list[Example]:
    return list(examples(HELDOUT_SEED, count, start))


def tokenizer_sentences() -> list[str]:
    """Task text for the tokenizer's training corpus, so questions and answers get whole-word pieces."""
    rng = random.Random("pmod-shapes/tokenizer")
    sentences = []
    for index in range(2000):
        objects, _ = random_scene(rng)
        question, answer = ask(rng, objects, QUESTION_TYPES[index % len(QUESTION_TYPES)])
        sentences.append(f"USER: {question} ASSISTANT: {answer}")
        if index % 4 == 0:
            sentences.append(f"USER: {DESCRIBE} ASSISTANT: {describe(objects)}")
    return sentences
