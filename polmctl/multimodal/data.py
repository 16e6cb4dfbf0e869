"""Picture-question rows -> token ids with image placeholders, and batches with pixel values.

    polmctl run recipe=vlm_adapter data.source=builtin:shapes
    polmctl run recipe=vlm_adapter data.source=my_rows.jsonl       # rows: prompt, completion, image

A row is a prompt/completion row (``polmctl.data`` formats) plus an ``image`` column: an
image file path, or a ``builtin:shapes`` picture description. A prompt without ``<image>``
gets it in front (LLaVA's convention). The prompt is rendered with the chat template and
tokenized as every polmctl objective does; its one ``<image>`` token is then expanded into
as many placeholders as the vision encoder yields patch features, as ``LlavaProcessor`` does
for text (tests/unit/test_multimodal.py checks the two agree).
"""

from __future__ import annotations

from pathlib import Path

import torch

from polmctl.data import DataError, EncodeStats, encode_row, pad_collate
from polmctl.data.builtin.shapes import render
from polmctl.objectives.base import IGNORE_INDEX
from polmctl.objectives.sft import SFTObjective


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
    raise DataError(f"{where}: column 'image' is a {type(value).__name__}; give an image file path or a "
                    "builtin:shapes picture description")


class VlmObjective(SFTObjective):
    """Cross-entropy on the answer tokens (``SFTObjective.__call__``: the batch's
    ``pixel_values`` reach the LLaVA model with the tokens), on rows that carry a picture."""

    def __init__(self, processor, image_tokens: int):
        super().__init__(method=None)
        self.processor, self.image_tokens = processor, image_tokens
        self.image_token = processor.image_token
        self.image_token_id = processor.tokenizer.convert_tokens_to_ids(self.image_token)

    def encode(self, rows: list[dict], tokenizer, data) -> tuple[list[dict], EncodeStats]:
        self.pad_token_id = tokenizer.pad_token_id
        stats = EncodeStats(rows=len(rows))
        examples = []
        for i, row in enumerate(rows):
            where = f"{data.source}: row {i}"
            if "image" not in row:
                raise DataError(f"{where} has no 'image' column; vlm rows need one (a file path or a picture "
                                "description)")
            load_image(row["image"], where)  # a bad picture fails here, not in the middle of training
            text_row = {"prompt": with_image_token(row.get("prompt"), self.image_token),
                        "completion": row.get("completion")}
            # Room for the expanded placeholders: max_length counts the final sequence.
            example = encode_row(text_row, "prompt_completion", tokenizer, where=where, overlong=data.overlong,
                                 max_length=max(data.max_length - self.image_tokens + 1, 2))
            if example is None:
                stats.dropped += 1
                stats.first_dropped_index = i if stats.first_dropped_index is None else stats.first_dropped_index
                continue
            example = self.expand(example)
            example["image"] = row["image"]
            examples.append(example)
            stats.kept += 1
            stats.tokens += len(example["input_ids"])
            stats.trainable_tokens += sum(label != IGNORE_INDEX for label in example["labels"][1:])
        if not examples:
            raise DataError(f"{data.source}: every row was dropped ({stats.summary()}); raise data.max_length")
        return examples, stats

    def expand(self, example: dict) -> dict:
        """One ``<image>`` token -> ``image_tokens`` of them (labels: ignored)."""
        ids, labels = example["input_ids"], example["labels"]
        if self.image_token_id not in ids:
            raise DataError(f"a prompt lost its {self.image_token} placeholder to truncation; raise data.max_length")
        at = ids.index(self.image_token_id)
        n = self.image_tokens
        return {"input_ids": ids[:at] + [self.image_token_id] * n + ids[at + 1:],
                "labels": labels[:at] + [IGNORE_INDEX] * n + labels[at + 1:]}

    def pixels(self, images: list) -> torch.Tensor:
        return self.processor.image_processor(images=[load_image(i) for i in images],
                                              return_tensors="pt")["pixel_values"]

    def collate(self, examples: list[dict]) -> dict:
        batch = pad_collate([{k: e[k] for k in ("input_ids", "labels")} for e in examples], self.pad_token_id)
        batch["pixel_values"] = self.pixels([e["image"] for e in examples])
        return batch
