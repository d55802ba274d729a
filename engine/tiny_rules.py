"""What the rest of threedis knows about the tiny random-weight checkpoints, without importing them (no torch).

The tiny checkpoints (threedis.engine.tiny) run every stage for real but draw noise. This
module holds what other code needs to know about them before, or instead of, loading one:
- how a folder is recognised as one: the marker file each writer writes last;
- which option takes each kind, and the hint that error messages end with;
- the settings a render on them gets where the caller gives none. At the real models'
  defaults (stage 1 at 512 px for 30 steps, FLUX 20 steps) a CPU takes minutes to draw that
  noise, so one rule holds for `threedis render / demo / batch`, the service and
  Engine.render: a tiny stage-1 checkpoint gets the demo's stage-1 numbers below, a tiny
  FLUX checkpoint the demo's step count, unless the caller gives them.
The CLI reads it for its --help and for the checks it makes before importing torch.
"""

from __future__ import annotations

import os
from pathlib import Path

from threedis.engine.errors import UserError
from threedis.engine.paths import cache_root  # the one place the cache folder is chosen

__all__ = ["DEMO_MAX_SIDE", "LDM3D_MARKER", "MARKER", "MIGC_STEPS", "OPTIONS", "STAGE1_SIZE", "STAGE1_STEPS",
           "STEPS", "cache_root", "is_tiny", "steps_for", "suggested_folder", "tiny_hint"]

MARKER = "threedis_tiny.json"  # FLUX, SAM2, Depth Anything: written last, so its presence means complete
LDM3D_MARKER = "threedis_tiny_ldm3d.json"  # the stage-1 checkpoint's own marker

# Where a tiny checkpoint of each kind goes on the command line (the last two: `threedis eval mig`'s models).
OPTIONS = {"flux": "--model", "ldm3d": "--stage1", "sam2": "--sam", "depth": "--depth-model",
           "grounding-dino": "--detector", "sam-vit": "--sam"}

STEPS = 4  # FLUX denoising steps on a tiny FLUX checkpoint (the real default: 20)
STAGE1_STEPS = 4  # stage-1 steps on a tiny stage-1 checkpoint (the real default: 30)
MIGC_STEPS = 2  # of which with the layout adapter on (the real default: 16)
STAGE1_SIZE = 64  # stage-1 generation size (the real default: 512)
DEMO_MAX_SIDE = 256  # `threedis demo` shrinks its example layout to this long side on the tiny checkpoints


def is_tiny(path: str | os.PathLike[str] | None) -> bool:
    """True for a folder holding a complete tiny checkpoint of any kind (False for hub ids and None)."""
    if path is None:
        return False
    folder = Path(os.fspath(path)).expanduser()
    return (folder / MARKER).is_file() or (folder / LDM3D_MARKER).is_file()


def steps_for(model: str | os.PathLike[str] | None, given: int | None, default: int = 20) -> int:
    """FLUX denoising steps: as given, else STEPS on a tiny FLUX checkpoint, else `default`."""
    if given is not None:
        return given
    return STEPS if is_tiny(model) else default


def suggested_folder(kind: str) -> Path:
    """A folder where a hint may safely tell the user to write a tiny `kind` (or "all"): under the cache."""
    return cache_root() / "make-tiny" / kind


def tiny_hint(kind: str) -> str:
    """The clause error messages end with: how to get a tiny stand-in for `kind` from the CLI."""
    try:
        folder: Path | str = suggested_folder(kind)
    except UserError:  # no cache folder (no home, no $THREEDIS_CACHE): the hint must not hide the error it ends
        folder = "DIR"
    return (f"for a test run without the real weights, `threedis make-tiny {kind} {folder}` writes a tiny "
            f"random-weight stand-in, then pass `{OPTIONS[kind]} {folder}` (`threedis demo` uses tiny "
            f"checkpoints by itself)")
