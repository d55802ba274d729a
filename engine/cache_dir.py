"""Where threedis keeps its caches ($THREEDIS_CACHE, else ~/.cache/threedis): one place, importing nothing heavy.

The tiny checkpoints, prompt embeddings, quantized weights and the service's token all
live under it; commands that must start fast (`threedis serve`'s checks) read it
without importing torch.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$THREEDIS_CACHE, else ~/.cache/threedis (read at each call: tests and apps may change it)."""
    env = os.environ.get("THREEDIS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "threedis"
