"""Where a model is: a local folder or a hub id; each model's default id; what to say when it is neither.

One reading of a model argument for FLUX, stage 1, SAM2, Depth Anything and LoRA files, and
one wording of the messages, in a module that imports neither torch nor the loaders: the CLI
refuses a missing folder with it before it imports torch (seconds, tens of seconds on a busy
machine), and the loaders refuse the same folder with the same words.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from threedis.engine.errors import UserError
from threedis.engine.paths import input_file
from threedis.engine.tiny_rules import tiny_hint

__all__ = ["DEFAULT_BASE_ID", "DEFAULT_DEPTH_MODEL", "DEFAULT_MODEL_ID", "DEFAULT_SAM_MODEL", "STAGE1_FOLDER",
           "depth_model_folder", "flux_folder", "flux_how_to_get", "hf_how_to_get", "hf_model_folder", "is_hub_id",
           "lora_file", "sam_folder", "stage1_folder"]

DEFAULT_MODEL_ID = "black-forest-labs/FLUX.1-Depth-dev"  # gated: licence + `hf auth login`
DEFAULT_BASE_ID = "Intel/ldm3d-4c"  # stage 1's base model
DEFAULT_SAM_MODEL = "facebook/sam2.1-hiera-large"
DEFAULT_DEPTH_MODEL = "depth-anything/Depth-Anything-V2-Large-hf"

STAGE1_FOLDER = (f"give an LDM3D-4c folder in diffusers layout (unet/, vae/, text_encoder/, tokenizer/, "
                 f"scheduler/) or the hub id {DEFAULT_BASE_ID}")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+")  # "owner/name": never starts with '.', '/' or '~'


def is_hub_id(text: str) -> bool:
    """True for text shaped like a hub repo id ("owner/name")."""
    return bool(_HUB_ID.fullmatch(text))


def _local_folder(text: str, what: str, file_hint: str, missing_hint: str) -> Path | None:
    """The folder `text` names (resolved), None for a hub id; a UserError for a file or a folder not there."""
    path = Path(text).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise UserError(f"{what} path {text} is a file; {file_hint}")
    if not is_hub_id(text):
        raise UserError(f"{what} folder not found: {text}; {missing_hint}")
    return None


def flux_how_to_get(target: str = "DIR", repo: str = DEFAULT_MODEL_ID) -> str:
    """How to get FLUX.1-Depth-dev: it is gated, so the licence and a login come first."""
    return (f"FLUX.1-Depth-dev is gated: accept its licence on huggingface.co and run `hf auth login` once, then "
            f"pass the hub id {repo}, or download it with `hf download {repo} --local-dir {target}` and pass "
            f"`--model {target}`; {tiny_hint('flux')}")


def flux_folder(path_or_id: str | os.PathLike[str]) -> Path | None:
    """FLUX.1-Depth-dev's local folder, or None for a hub id to fetch."""
    text = os.fspath(path_or_id)
    return _local_folder(text, "model", "give the checkpoint folder (with transformer/, vae/, ...)",
                         flux_how_to_get(text))


def stage1_folder(path_or_id: str | os.PathLike[str]) -> Path | None:
    """Stage 1's base folder (LDM3D-4c, with the authors' two files beside), or None for a hub id."""
    how = f"{STAGE1_FOLDER}; {tiny_hint('ldm3d')}"
    return _local_folder(os.fspath(path_or_id), "stage-1 base model", how, how)


def hf_how_to_get(default_id: str, tiny_kind: str) -> str:
    return (f"download it with `hf download {default_id} --local-dir DIR` on a connected machine and pass DIR; "
            f"{tiny_hint(tiny_kind)}")


def hf_model_folder(path_or_id: str | os.PathLike[str], what: str, default_id: str, tiny_kind: str) -> Path | None:
    """A transformers model's local folder (SAM2, Depth Anything), or None for a hub id."""
    return _local_folder(os.fspath(path_or_id), what, "give the folder holding config.json and model.safetensors",
                         hf_how_to_get(default_id, tiny_kind))


def sam_folder(path_or_id: str | os.PathLike[str]) -> Path | None:
    """SAM2's local folder, or None for a hub id (the words of sam_masks.SamMasker.from_pretrained)."""
    return hf_model_folder(path_or_id, "SAM2 model", DEFAULT_SAM_MODEL, "sam2")


def depth_model_folder(path_or_id: str | os.PathLike[str]) -> Path | None:
    """Depth Anything's local folder, or None for a hub id (the words of DepthEstimator.from_pretrained)."""
    return hf_model_folder(path_or_id, "depth model", DEFAULT_DEPTH_MODEL, "depth")


def lora_file(path: str | os.PathLike[str]) -> Path:
    """The .safetensors file of a LoRA given as a file or a folder holding exactly one."""
    path = Path(path)
    if path.is_dir():
        preferred = path / "pytorch_lora_weights.safetensors"
        candidates = [preferred] if preferred.is_file() else sorted(path.glob("*.safetensors"))
        if len(candidates) != 1:
            found = ", ".join(p.name for p in candidates) or "none"
            raise UserError(f"LoRA folder {path} must hold one .safetensors file (found: {found}); pass the file")
        return candidates[0]
    input_file(path, "LoRA file")
    if path.suffix != ".safetensors":
        raise UserError(f"LoRA {path} is not a .safetensors file; pickled LoRAs (.bin/.pt/.ckpt) are not loaded")
    return path
