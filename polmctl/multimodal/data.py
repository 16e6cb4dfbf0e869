"""Picture-question rows -> token ids with image placeholders, and batches with pixel values.

    polmctl run recipe=vlm_adapter data.source=builtin:shapes
    polmctl run recipe=vlm_adapter data.source=my_rows.jsonl       # rows: prompt, completion, image

A row is a prompt/completion row (``polmctl.data`` formats) plus an ``image`` column: an
image file path, or a ``builtin:shapes`` picture description. A prompt without ``<image>``
gets it in front (LLaVA's convention). The prompt is rendered with the chat template and
tokenized as every polmctl objective does; its one ``<image>`` token is then expanded into
as many placeholders as the vision encoder yields patch features, as ``LlavaProcessor`` does
for text (tests/multimodal/test_model.py checks the two agree).
"""

from __future__ import annotations

from pathlib import Path

from polmctl.data.builtin.shapes import render
from polmctl.errors import DataError


def with_image_token(prompt, image_token: str):
    """The prompt with exactly one image placeholder (prepended when it has none)."""
    if not isinstance(prompt, str):
        raise DataError("vlm rows need a text 'prompt' (a message-list prompt is not supported yet)")
    count = prompt.count(image_token)
    if count > 1:
        raise DataError(f"a prompt holds {count} {image_token} placeholders; one picture per row is supported")
    return prompt if count else f"{image_token}\n{prompt}"


def load_image(value, where: str = "row"):
    """A PIL RGB image from a row's ``image`` column: a file path or a builtin:shapes description."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, dict):
        return render(value)
    if isinstance(value, str):
        path = Path(value).expanduser()
        if not path.is_file():
            raise DataError(f"{where}: image file {value} does not exist")
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except (UnidentifiedImageError, OSError) as err:
            raise DataError(f"{where}: {value} is not a readable image ({err})") from None
    raise DataError(
        f"{where}: column 'image' is a {type(value).__name__}; give an image file path or a "
        "builtin:shapes picture description"
    )
