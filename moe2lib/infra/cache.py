"""The per-user cache of built and converted files (models, merged experts, embeddings, device measurements)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where converted and assembled models live (``MOE2_CACHE``, default ``~/.cache/moe2``)."""
    path = Path(os.environ.get("MOE2_CACHE", Path.home() / ".cache" / "moe2"))
    path.mkdir(parents=True, exist_ok=True)
    return path
