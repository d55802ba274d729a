"""A command's checks that need neither torch nor a model, made before torch is imported.

Why: importing torch, diffusers and transformers takes seconds, over half a minute on a busy
machine, and a render refused for a GPU profile on a CPU, a model folder that is not there or
a depth file that is missing should be refused at once. Every check here is the engine's own
(model_paths, checks, profiles, outputs), so the words are the ones the engine would use; the
engine still makes each of them when it loads, for callers of the Python API.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

from threedis.engine import model_paths
from threedis.engine.checks import device_type, no_cuda_message
from threedis.engine.cuda_probe import cuda_surely_absent
from threedis.engine.errors import UserError
from threedis.engine.paths import input_file

__all__ = ["check_files", "check_models", "check_profile"]


def check_models(model: Any = None, stage1: Any = None, sam: Any = None, depth_model: Any = None,
                 loras: Iterable[Any] = ()) -> None:
    """Model folders and LoRA files that are named but not there; hub ids are left to the loaders."""
    if model:
        model_paths.flux_folder(model)
    if stage1 and stage1 != "auto":
        model_paths.stage1_folder(stage1)
    if sam:
        model_paths.sam_folder(sam)
    if depth_model:
        model_paths.depth_model_folder(depth_model)
    for path in loras:
        model_paths.lora_file(path)


def check_files(files: Mapping[str, Path | None]) -> None:
    """Input files named by a flag (flag -> path) that are not there, or not files (threedis.engine.paths)."""
    for flag, path in files.items():
        if path is not None:
            input_file(path, flag)


def check_profile(profile: str, overrides: Mapping[str, Any] | None, device: str | None) -> None:
    """The profile (name or file, with its overrides) for the device: torch only when CUDA may be there."""
    from threedis.engine.profiles import resolve_profile

    kind = device_type(device)
    if device is not None and kind is None:
        return  # not a device name: parse_device says so, in its words
    if kind == "cuda" and cuda_surely_absent():
        raise UserError(no_cuda_message(device))
    resolve_profile(profile, device, overrides or None)
