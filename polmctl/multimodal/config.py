"""The ``method`` node of ``recipe=vlm_adapter`` (``method.objective: vlm``, run by ``runner: vlm``).

    polmctl run recipe=vlm_adapter method.stage1_fraction=1.0         # stage 1 only: the projector
    polmctl run recipe=vlm_adapter method.vision_model=google/siglip-base-patch16-224

This module imports no torch: the objectives registry imports ``VlmMethod``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from polmctl.config.schema import ConfigError, _f, one_of, positive

ACTIVATIONS = ("gelu", "relu", "silu", "quick_gelu")


@dataclass
class VlmMethod:
    objective: str = _f("vlm", "vlm: a vision encoder + projector in front of the language model (runner: vlm)")
    vision_model: Optional[str] = _f(None, "a pretrained vision model (hub id or dir: SigLIP, CLIP, ...); None "
                                           "builds a random SigLIP encoder from the vision_* sizes below")
    image_size: int = _f(32, "random encoder: input picture side in pixels (pictures are resized to it)")
    patch_size: int = _f(8, "random encoder: patch side in pixels; (image_size / patch_size)^2 image tokens")
    vision_hidden_size: int = _f(64, "random encoder: hidden size")
    vision_layers: int = _f(2, "random encoder: transformer layers")
    vision_heads: int = _f(4, "random encoder: attention heads")
    vision_feature_layer: int = _f(-1, "which hidden state of the encoder feeds the projector (0: the patch "
                                       "embeddings, -1: the last layer; LLaVA uses -2 with a pretrained CLIP)")
    projector_act: str = _f("gelu", "activation between the projector's two linear layers: "
                                    "gelu | relu | silu | quick_gelu")
    stage1_fraction: float = _f(0.5, "share of trainer.max_steps spent in stage 1 (projector only; LM and "
                                     "encoder frozen); the rest is stage 2 (projector + peft adapters on the LM). "
                                     "1.0: stage 1 only; 0.0: stage 2 only")
    stage1_lr: Optional[float] = _f(None, "stage 1 peak learning rate (None: trainer.lr); stage 2 uses trainer.lr")
    train_vision: bool = _f(False, "also train the vision encoder (both stages); by default it stays frozen")
    train: bool = _f(True, "false: no training, only evaluate model.name_or_path (a saved VLM dir or a "
                           "vlm_adapter run dir), as `polmctl eval <run dir>` does")

    def check(self, section: str) -> None:
        for name in ("image_size", "patch_size", "vision_hidden_size", "vision_layers", "vision_heads"):
            positive(section, name, getattr(self, name))
        if self.image_size % self.patch_size:
            raise ConfigError(f"{section}.patch_size", f"{self.patch_size} does not divide "
                                                       f"method.image_size={self.image_size}")
        if self.vision_hidden_size % self.vision_heads:
            raise ConfigError(f"{section}.vision_heads", f"{self.vision_heads} does not divide "
                                                         f"method.vision_hidden_size={self.vision_hidden_size}")
        if self.vision_model is None and not -self.vision_layers - 1 <= self.vision_feature_layer <= self.vision_layers:
            raise ConfigError(f"{section}.vision_feature_layer", f"{self.vision_feature_layer} is outside the encoder's "
                                                                 f"{self.vision_layers} + 1 hidden states")
        one_of(section, "projector_act", self.projector_act, ACTIVATIONS)
        if not 0 <= self.stage1_fraction <= 1:
            raise ConfigError(f"{section}.stage1_fraction", f"must be in [0, 1], got {self.stage1_fraction!r}")
        if self.stage1_lr is not None:
            positive(section, "stage1_lr", self.stage1_lr)
