"""Tiny random-weight checkpoints in the real on-disk layouts, written offline in seconds.

Why: tests, `threedis demo` and a newcomer without 30+ GB of gated weights need real
checkpoints (same files, same loader classes) that run in milliseconds on a CPU. One
module per model: `flux` (FLUX.1-Depth-dev), `ldm3d` (stage 1: LDM3D-4c plus the
authors' two release files), `sam2` (SAM 2.1), `depth` (Depth Anything V2), and the
COCO-MIG evaluation's `grounding_dino` (Grounding DINO) and `sam_vit` (SAM ViT); `text`
trains their tokenizers, `store` holds what they share (cache, markers, permissions,
where writing is refused). `threedis make-tiny KIND PATH` writes any of them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from threedis.engine.tiny import depth, flux, grounding_dino, ldm3d, sam2, sam_vit
from threedis.engine.tiny.flux import (
    MARKER, TINY_FLUX, TINY_VERSION, is_tiny_checkpoint, tiny_flux_path, write_tiny_flux,
)
from threedis.engine.errors import UserError
from threedis.engine.tiny.store import check_new_folder, example_clause, new_folder_guard
from threedis.engine.tiny_rules import OPTIONS, suggested_folder, tiny_hint

__all__ = ["KINDS", "MARKER", "TINY_FLUX", "TINY_VERSION", "TinyKind", "is_tiny_checkpoint", "tiny_flux_path",
           "suggested_folder", "tiny_hint", "write_tiny", "write_tiny_flux"]


@dataclass(frozen=True)
class TinyKind:
    """One kind of tiny checkpoint: how to write it, its cached copy, and the option that takes its folder."""

    what: str  # for messages
    write: Callable[..., Path]  # write(path, seed=0) -> path
    cached: Callable[[], Path]  # the copy `threedis demo` builds in the cache
    stands_in_for: str  # the real model's hub id
    option: str  # where the folder goes on the command line


KINDS: dict[str, TinyKind] = {
    "flux": TinyKind("FLUX.1-Depth-dev", flux.write_tiny_flux, flux.tiny_flux_path, flux.STANDS_IN_FOR,
                     OPTIONS["flux"]),
    "ldm3d": TinyKind("stage-1 LDM3D-4c + adapter", ldm3d.write_tiny_ldm3d, ldm3d.tiny_ldm3d_path,
                      ldm3d.STANDS_IN_FOR, OPTIONS["ldm3d"]),
    "sam2": TinyKind("SAM2", sam2.write_tiny_sam2, sam2.tiny_sam2_path, sam2.STANDS_IN_FOR, OPTIONS["sam2"]),
    "depth": TinyKind("Depth Anything V2", depth.write_tiny_depth_anything, depth.tiny_depth_anything_path,
                      depth.STANDS_IN_FOR, OPTIONS["depth"]),
    "grounding-dino": TinyKind("Grounding DINO (threedis eval mig's detector)",
                               grounding_dino.write_tiny_grounding_dino, grounding_dino.tiny_grounding_dino_path,
                               grounding_dino.STANDS_IN_FOR, OPTIONS["grounding-dino"]),
    "sam-vit": TinyKind("SAM ViT (threedis eval mig's segmenter)", sam_vit.write_tiny_sam_vit,
                        sam_vit.tiny_sam_vit_path, sam_vit.STANDS_IN_FOR, OPTIONS["sam-vit"]),
}


def write_tiny(kind: str, path: str | os.PathLike[str], seed: int = 0) -> list[tuple[str, Path]]:
    """Write tiny `kind` (a key of KINDS, or "all": one subfolder each) into a new folder.

    Refuses (UserError) a file, a non-empty folder, a system folder and a folder
    named like a real model; returns (kind, folder) per checkpoint written.
    """
    from threedis.engine.checks import check_seed

    kinds = list(KINDS) if kind == "all" else [kind]
    if any(name not in KINDS for name in kinds):
        raise KeyError(kind)
    seed = check_seed(seed)  # before anything is written: the writers' torch seeds take 0..2^64-1
    try:
        instead = suggested_folder(kind)
    except UserError:  # no cache folder to suggest (no home, no $THREEDIS_CACHE): the message names none
        instead = None
    root = check_new_folder(path, [spec.stands_in_for for spec in KINDS.values()], instead=instead)
    with new_folder_guard(root, f"choose a folder you can write{example_clause(instead)}"):
        if kind == "all":
            return [(name, KINDS[name].write(root / name, seed=seed)) for name in kinds]
        return [(kind, KINDS[kind].write(root, seed=seed))]
