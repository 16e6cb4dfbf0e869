"""LLaVA-style vision adapters: the ``method`` node and the training step (the vlm runner,
polmctl/runners/vlm.py, builds the model with polmctl/multimodal/ and runs the two stages).

    polmctl run recipe=vlm_adapter
    polmctl run recipe=vlm_adapter method.stage1_fraction=1.0         # stage 1 only: the projector
    polmctl run recipe=vlm_adapter method.vision_model=google/siglip-base-patch16-224

Picture-question rows -> token ids with image placeholders, and batches with pixel values: a row
is a prompt/completion row plus an ``image`` column (a file path or a ``builtin:shapes`` picture
description). The prompt is rendered with the chat template and tokenized as every polmctl method
does; its one ``<image>`` token is then expanded into as many placeholders as the vision encoder
yields patch features, as ``LlavaProcessor`` does for text (tests/multimodal/test_model.py checks
the two agree).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from polmctl.config.schema import one_of, option, positive
from polmctl.data import EncodeStats, encode_row, pad_collate
from polmctl.engine.contract import LossTerms, Objective
from polmctl.errors import ConfigError, DataError
from polmctl.losses import IGNORE_INDEX
from polmctl.methods.sft import SFTObjective
from polmctl.multimodal.data import load_image, with_image_token

ACTIVATIONS = ("gelu", "relu", "silu", "quick_gelu")


@dataclass
class VlmMethod:
    name: str = option("vlm", "vlm: a vision encoder + projector in front of the language model")
    vision_model: Optional[str] = option(
        None,
        "a pretrained vision model (hub id or dir: SigLIP, CLIP, ...); None "
        "builds a random SigLIP encoder from the vision_* sizes below",
    )
    image_size: int = option(32, "random encoder: input picture side in pixels (pictures are resized to it)")
    patch_size: int = option(8, "random encoder: patch side in pixels; (image_size / patch_size)^2 image tokens")
    vision_hidden_size: int = option(64, "random encoder: hidden size")
    vision_layers: int = option(2, "random encoder: transformer layers")
    vision_heads: int = option(4, "random encoder: attention heads")
    vision_feature_layer: int = option(
        -1,
        "which hidden state of the encoder feeds the projector (0: the patch "
        "embeddings, -1: the last layer; LLaVA uses -2 with a pretrained CLIP)",
    )
    projector_act: str = option(
        "gelu", "activation between the projector's two linear layers: gelu | relu | silu | quick_gelu"
    )
    stage1_fraction: float = option(
        0.5,
        "share of trainer.max_steps spent in stage 1 (projector only; LM and "
        "encoder frozen); the rest is stage 2 (projector + peft adapters on the LM). "
        "1.0: stage 1 only; 0.0: stage 2 only",
    )
    stage1_lr: Optional[float] = option(None, "stage 1 peak learning rate (None: trainer.lr); stage 2 uses trainer.lr")
    train_vision: bool = option(False, "also train the vision encoder (both stages); by default it stays frozen")
    train: bool = option(
        True,
        "false: no training, only evaluate model.name_or_path (a saved VLM dir or a "
        "vlm_adapter run dir), as `polmctl eval <run dir>` does",
    )

    def check(self, section: str) -> None:
        for name in ("image_size", "patch_size", "vision_hidden_size", "vision_layers", "vision_heads"):
            positive(section, name, getattr(self, name))
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"{section}.patch_size", f"{self.patch_size} does not divide method.image_size={self.image_size}"
            )
        if self.vision_hidden_size % self.vision_heads:
            raise ConfigError(
                f"{section}.vision_heads",
                f"{self.vision_heads} does not divide method.vision_hidden_size={self.vision_hidden_size}",
            )
        if self.vision_model is None and not -self.vision_layers - 1 <= self.vision_feature_layer <= self.vision_layers:
            raise ConfigError(
                f"{section}.vision_feature_layer",
                f"{self.vision_feature_layer} is outside the encoder's {self.vision_layers} + 1 hidden states",
            )
        one_of(section, "projector_act", self.projector_act, ACTIVATIONS)
        if not 0 <= self.stage1_fraction <= 1:
            raise ConfigError(f"{section}.stage1_fraction", f"must be in [0, 1], got {self.stage1_fraction!r}")
        if self.stage1_lr is not None:
            positive(section, "stage1_lr", self.stage1_lr)


class VlmObjective(Objective):
    """Cross-entropy on the answer tokens (SFT's step: the batch's ``pixel_values`` reach the LLaVA
    model with the tokens), on rows that carry a picture."""

    def __init__(self, processor, image_tokens: int):
        self.sft = SFTObjective()
        self.pad_token_id = 0
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
                raise DataError(
                    f"{where} has no 'image' column; vlm rows need one (a file path or a picture description)"
                )
            load_image(row["image"], where)  # a bad picture fails here, not in the middle of training
            text_row = {
                "prompt": with_image_token(row.get("prompt"), self.image_token),
                "completion": row.get("completion"),
            }
            # Room for the expanded placeholders: max_length counts the final sequence.
            example = encode_row(
                text_row,
                "prompt_completion",
                tokenizer,
                where=where,
                overlong=data.overlong,
                max_length=max(data.max_length - self.image_tokens + 1, 2),
            )
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
        return {
            "input_ids": ids[:at] + [self.image_token_id] * n + ids[at + 1 :],
            "labels": labels[:at] + [IGNORE_INDEX] * n + labels[at + 1 :],
        }

    def pixels(self, images: list) -> torch.Tensor:
        return self.processor.image_processor(images=[load_image(i) for i in images], return_tensors="pt")[
            "pixel_values"
        ]

    def collate(self, examples: list[dict]) -> dict:
        batch = pad_collate([{k: e[k] for k in ("input_ids", "labels")} for e in examples], self.pad_token_id)
        batch["pixel_values"] = self.pixels([e["image"] for e in examples])
        return batch

    def weight(self, batch: dict) -> int:
        return self.sft.weight(batch)

    def __call__(self, model: torch.nn.Module, batch: dict) -> LossTerms:
        return self.sft(model, batch)
