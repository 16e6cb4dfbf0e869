"""builtin:shapes: deterministic, split by picture, answers that match the pictures drawn."""

from __future__ import annotations

import json

import pytest

from polmctl.data import load_rows
from polmctl.data.builtin.shapes import COLOURS, SHAPES, render, shapes
from polmctl.errors import DataError

pytestmark = pytest.mark.unit


def test_rows_are_deterministic_json_and_sized():
    rows = shapes("train", n=50, seed=3)
    assert rows == shapes("train", n=50, seed=3)
    assert rows != shapes("train", n=50, seed=4)
    assert json.loads(json.dumps(rows)) == rows
    assert len(load_rows("builtin:shapes", "test")) == 200


def test_train_and_test_never_share_a_picture():
    def pictures(rows):
        return {json.dumps(r["image"], sort_keys=True) for r in rows}

    assert not pictures(shapes("train", n=2000)) & pictures(shapes("test", n=200))


def test_answers_follow_the_scene():
    for row in shapes("test", n=100, shapes=3, image_size=48):
        scene = row["image"]["shapes"]
        assert row["prompt"].startswith("<image>\n") and row["completion"] == row["answer"]
        assert len({s["shape"] for s in scene}) == len({s["colour"] for s in scene}) == 3
        if row["answer"] in COLOURS:
            shape = next(s for s in SHAPES if f"the {s}?" in row["prompt"])
            assert [s["colour"] for s in scene if s["shape"] == shape] == [row["answer"]]
            assert row["choices"] == list(COLOURS)
        else:
            colour = next(c for c in COLOURS if f"is {c}?" in row["prompt"])
            assert [s["shape"] for s in scene if s["colour"] == colour] == [row["answer"]]
            assert row["choices"] == list(SHAPES)


def test_render_draws_each_shape_in_its_colour():
    row = shapes("train", n=1, seed=7)[0]
    image = render(row["image"])
    assert image.size == (32, 32) and image.mode == "RGB"
    for s in row["image"]["shapes"]:
        # A triangle's centre row is inside it too (apex up, base at y + r).
        assert image.getpixel((s["x"], s["y"] + 1)) == COLOURS[s["colour"]]
    assert (255, 255, 255) in set(image.getdata())  # the background shows between the shapes


def test_bad_options_and_descriptions_fail_clearly():
    with pytest.raises(DataError, match="data.options.shapes"):
        shapes("train", n=2, shapes=4)
    with pytest.raises(DataError, match="image_size"):
        shapes("train", n=2, image_size=8)
    with pytest.raises(DataError, match="no option 'colours'"):
        load_rows("builtin:shapes", options={"colours": 3})
    with pytest.raises(DataError, match="malformed"):
        render({"size": 32})
    with pytest.raises(DataError, match="unknown shape 'star'"):
        render({"size": 32, "shapes": [{"shape": "star", "colour": "red", "x": 5, "y": 5, "r": 3}]})
