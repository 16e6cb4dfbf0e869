"""Where builtin models are materialised: model.cache_dir, else $POLMCTL_CACHE, else ~/.cache/polmctl."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root(cache_dir: str | None = None) -> Path:
    """The polmctl cache directory (created if missing).

    ``cache_dir`` wins, then the ``POLMCTL_CACHE`` environment variable, then
    ``~/.cache/polmctl``. Builtin models live under ``<root>/models/<name>``.
    """
    root = Path(cache_dir or os.environ.get("POLMCTL_CACHE") or Path.home() / ".cache" / "polmctl").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root
