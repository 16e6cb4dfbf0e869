"""``builtin:shapes``: synthetic pictures of coloured shapes, with questions whose answers can be checked.

    polmctl run recipe=vlm_adapter                                  # trains on it
    polmctl run recipe=vlm_adapter data.options.image_size=48 data.options.shapes=3

Row: {"prompt": "<image>\\nWhat colour is the circle? Answer with one word.", "completion": "red",
      "answer": "red", "choices": ["red", "green", ...],
      "image": {"size": 32, "shapes": [{"shape": "circle", "colour": "red", "x": 9, "y": 20, "r": 6}, ...]}}.
Each picture holds ``shapes`` shapes, every one a different kind and a different colour, so
"What colour is the circle?" and "Which shape is red?" have exactly one answer. The image is
kept as its JSON description (rows stay JSON-serialisable and small); ``render`` draws it
with PIL, the same pixels every time. ``choices`` (every colour, or every shape kind) gives
the chance level of a question: 1 / len(choices).

Train and test never share a picture: the split is a function of the scene (kinds, colours,
positions) alone, whatever is asked about it.
"""

from __future__ import annotations

import random

from polmctl.data.builtin.split import check_int, sample_split
from polmctl.errors import DataError

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (255, 255, 255)
DEFAULT_N = {"train": 2000, "test": 200}
COLOUR_QUESTION = "What colour is the {shape}? Answer with one word."
SHAPE_QUESTION = "Which shape is {colour}? Answer with one word."

__all__ = ["shapes", "render", "COLOURS", "SHAPES"]


def _place(rng: random.Random, size: int, count: int) -> list[tuple[int, int, int]]:
    """``count`` non-overlapping (x, y, r) discs inside a ``size`` x ``size`` picture."""
    r_min, r_max = max(2, size // 8), max(3, size // 5)
    for _ in range(1000):
        placed: list[tuple[int, int, int]] = []
        for _ in range(count):
            r = rng.randint(r_min, r_max)
            x, y = rng.randint(r, size - 1 - r), rng.randint(r, size - 1 - r)
            if all((x - px) ** 2 + (y - py) ** 2 > (r + pr + 1) ** 2 for px, py, pr in placed):
                placed.append((x, y, r))
        if len(placed) == count:
            return placed
    raise DataError(
        f"builtin:shapes cannot fit {count} shapes in a {size}x{size} picture; raise "
        "data.options.image_size or lower data.options.shapes"
    )


def _draw(rng: random.Random, size: int, count: int) -> tuple[tuple, dict]:
    kinds = rng.sample(SHAPES, count)
    colours = rng.sample(list(COLOURS), count)
    scene = [
        {"shape": k, "colour": c, "x": x, "y": y, "r": r}
        for k, c, (x, y, r) in zip(kinds, colours, _place(rng, size, count))
    ]
    target = rng.choice(scene)
    if rng.random() < 0.5:
        question, answer, choices = COLOUR_QUESTION.format(shape=target["shape"]), target["colour"], list(COLOURS)
    else:
        question, answer, choices = SHAPE_QUESTION.format(colour=target["colour"]), target["shape"], list(SHAPES)
    row = {
        "prompt": f"<image>\n{question}",
        "completion": answer,
        "answer": answer,
        "choices": choices,
        "image": {"size": size, "shapes": scene},
    }
    identity = tuple(tuple(s.values()) for s in scene)
    return (identity, question), row


def shapes(
    split: str = "train", *, n: int | None = None, image_size: int = 32, shapes: int = 2, seed: int = 0
) -> list[dict]:
    """``n`` picture questions of ``split`` (train: 2000, test: 200 by default)."""
    check_int("shapes", "image_size", image_size, 16)
    check_int("shapes", "shapes", shapes, 1)
    if shapes > len(SHAPES):
        raise DataError(
            f"builtin:shapes option shapes={shapes}: at most {len(SHAPES)} (one of each kind: "
            f"{', '.join(SHAPES)}) (data.options.shapes)"
        )
    count = n if n is not None else DEFAULT_N.get(split, DEFAULT_N["test"])
    return sample_split(
        split, count, seed, lambda rng: _draw(rng, image_size, shapes), name="shapes", identity=lambda key: key[0]
    )


def render(spec: dict):
    """The PIL RGB image an ``image`` description of this module stands for."""
    from PIL import Image, ImageDraw

    try:
        size = int(spec["size"])
        image = Image.new("RGB", (size, size), BACKGROUND)
        draw = ImageDraw.Draw(image)
        for s in spec["shapes"]:
            x, y, r, fill = s["x"], s["y"], s["r"], COLOURS[s["colour"]]
            if s["shape"] == "circle":
                draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
            elif s["shape"] == "square":
                draw.rectangle((x - r, y - r, x + r, y + r), fill=fill)
            elif s["shape"] == "triangle":
                draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
            else:
                raise DataError(f"unknown shape {s['shape']!r} in an image description; use {', '.join(SHAPES)}")
    except DataError:
        raise
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(
            f"an 'image' description is malformed ({type(err).__name__}: {err}); expected "
            "{'size': N, 'shapes': [{'shape', 'colour', 'x', 'y', 'r'}, ...]}"
        ) from None
    return image
