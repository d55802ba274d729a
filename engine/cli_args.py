"""The flags several `threedis` commands share, defined once so that they read the same everywhere.

render, demo, batch and serve take the same `--sam [PATH_OR_ID]` and `--lora PATH[:SCALE]`
(repeatable); `--lora-scale` is the old render spelling, still read. No torch here: the
parsers are built for `--help` too.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

from threedis.engine.checks import check_lora_scale
from threedis.engine.errors import UserError

__all__ = ["LORA_METAVAR", "SAM_DEFAULT", "add_lora_argument", "add_sam_argument", "lora_arg", "loras", "sam_spec"]

SAM_DEFAULT = "(default)"  # `--sam` without a value: the engine's default SAM2 model
LORA_METAVAR = "PATH[:SCALE]"


def add_sam_argument(group: Any, help: str) -> None:
    group.add_argument("--sam", nargs="?", const=SAM_DEFAULT, default=None, metavar="PATH_OR_ID", help=help)


def sam_spec(value: str | None) -> str | None:
    """--sam's value as a model for the engine: None for the default model (and for no --sam)."""
    return None if value in (None, SAM_DEFAULT) else value


def lora_arg(text: str) -> tuple[str, float | None]:
    """'style.safetensors' -> (path, None); 'style.safetensors:0.8' -> (path, 0.8).

    A ':' followed by something that is not a number stays part of the path (C:\\loras\\x).
    """
    path, sep, scale = text.rpartition(":")
    if not (sep and path):
        return text, None
    try:
        value = float(scale)
    except ValueError:
        return text, None
    try:  # the engine's one range (checks.check_lora_scale): what an image's metadata can record
        return path, check_lora_scale(value, f"the LoRA scale in {text!r}")
    except UserError as err:
        raise argparse.ArgumentTypeError(f"{err}; e.g. {path}:0.8") from None


def add_lora_argument(group: Any, old_scale_flag: bool = False) -> None:
    group.add_argument("--lora", action="append", default=[], type=lora_arg, metavar=LORA_METAVAR,
                       help="FLUX LoRA (diffusers or kohya .safetensors file, or a folder holding one) and its scale "
                            "(default 1.0); repeatable")
    if old_scale_flag:
        group.add_argument("--lora-scale", type=float, default=None,
                           help="deprecated: write --lora PATH:SCALE (sets the scale of each --lora given without one)")


def loras(given: Sequence[tuple[str, float | None]], old_scale: float | None = None,
          resolve: bool = False) -> list[tuple[str, float]]:
    """--lora values as (path, scale) pairs: a LoRA without its own scale gets --lora-scale, else 1.0."""
    fallback = 1.0 if old_scale is None else check_lora_scale(old_scale, "--lora-scale")
    return [(str(Path(path).resolve()) if resolve else path, fallback if scale is None else scale)
            for path, scale in given]
