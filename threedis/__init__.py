"""threedis-flux: low-VRAM 3DIS-FLUX multi-instance layout-to-image engine.

The top-level package stays light: `import threedis.kernels` must not pull in
diffusers, so the engine-level names are imported lazily on first use.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Layout": "threedis.engine.layout",
    "Instance": "threedis.engine.layout",
    "LayoutError": "threedis.engine.layout",
    "Engine": "threedis.engine.api",
    "RenderResult": "threedis.engine.api",
    "RenderOptions": "threedis.engine.api",
    "Stage1Options": "threedis.engine.api",
    "RenderCancelled": "threedis.engine.api",
    "UserError": "threedis.engine.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'threedis' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
