"""Write merged tensors as they are computed, in safetensors shards ``from_pretrained`` reads.

    polmctl run recipe=merge "method.models=[A,B]" method.max_shard_mb=500

``save_pretrained`` needs the whole model in memory; this writer holds at most one shard
(``max_bytes``): when the next tensor would overflow it, the shard goes to disk. One shard is
``model.safetensors``; more are ``model-0000K-of-0000N.safetensors`` plus
``model.safetensors.index.json``, the layout transformers writes itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file


class ShardWriter:
    def __init__(self, out_dir: Path, max_bytes: int):
        self.out_dir, self.max_bytes = Path(out_dir), max_bytes
        self.current: dict[str, torch.Tensor] = {}
        self.current_bytes = 0
        self.shards: list[list[str]] = []  # tensor names per written shard
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.current and self.current_bytes + size > self.max_bytes:
            self._flush()
        self.current[name] = tensor.contiguous()
        self.current_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        save_file(self.current, str(self._part(len(self.shards))), metadata={"format": "pt"})
        self.shards.append(list(self.current))
        self.current, self.current_bytes = {}, 0

    def _part(self, i: int) -> Path:
        return self.out_dir / f"part-{i}.safetensors.tmp"

    def close(self) -> list[Path]:
        """Write the last shard and give every shard its final name; returns the files."""
        if self.current or not self.shards:
            self._flush()
        count = len(self.shards)
        if count == 1:
            names = ["model.safetensors"]
        else:
            names = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
            weight_map = {t: names[i] for i, shard in enumerate(self.shards) for t in shard}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        for i, name in enumerate(names):
            os.replace(self._part(i), self.out_dir / name)
        return [self.out_dir / n for n in names]
