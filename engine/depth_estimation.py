"""Depth from a photo with Depth Anything V2, as a grey map in stage 1's convention.

Why: a user who has a reference photo can skip stage 1 (layout -> depth) and still
give FLUX.1-Depth a control image. Depth Anything predicts *relative inverse depth*
(disparity: larger = nearer), which is exactly what stage 1's depth channel looks
like after its 8-bit save (near = bright), so a min-max stretch is all it needs.

Runs through transformers' AutoImageProcessor + AutoModelForDepthEstimation
(DepthAnythingForDepthEstimation). Also home of `resolve_hf_model`, the small
"local folder or hub id -> checked local folder" step shared with the SAM2 masker.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from threedis.engine.errors import NonFiniteError, UserError
from threedis.engine.config_check import read_json
from threedis.engine.paths import input_file
from threedis.engine.loading import (
    checked_from_pretrained,
    default_device,
    default_dtype,
    loading_component,
    read_component_config,
)
from threedis.engine.model_paths import DEFAULT_DEPTH_MODEL, hf_how_to_get, hf_model_folder

__all__ = ["DEFAULT_DEPTH_MODEL", "DepthEstimator", "normalize_depth", "open_image", "resolve_hf_model"]

_HUB_FILES = ["config.json", "preprocessor_config.json", "processor_config.json",
              "*.safetensors", "*.safetensors.index.json"]


def _missing_files(folder: Path) -> list[str]:
    """What a transformers image model folder lacks: config, preprocessor config, safetensors weights."""
    missing = [n for n in ("config.json", "preprocessor_config.json") if not (folder / n).is_file()]
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if not single.is_file() and not index.is_file():
        missing.append("model.safetensors")
    elif not single.is_file():
        import json

        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except PermissionError:
            raise  # not a download problem: loading_component names it
        except (OSError, ValueError, KeyError, AttributeError, TypeError):
            return [*missing, f"{index.name} (unreadable)"]
        missing += sorted(s for s in shards if not (folder / s).is_file())
    return missing


def resolve_hf_model(path_or_id: str | os.PathLike[str], what: str, default_id: str,
                     local_files_only: bool = False, tiny_kind: str = "depth",
                     extra_files: Sequence[str] = (), required_files: Sequence[str] = ()) -> Path:
    """Local folder holding a complete transformers checkpoint, or one UserError saying how to get it.

    `what` names the model in messages ("depth model", "SAM2 model"), `tiny_kind` its tiny
    stand-in (threedis.engine.tiny_rules); pickled weights (*.bin) are never fetched or accepted.
    extra_files: more files to fetch (a tokenizer's); required_files: those of them that must be there.
    """
    text = os.fspath(path_or_id)
    how = hf_how_to_get(default_id, tiny_kind)
    path = hf_model_folder(text, what, default_id, tiny_kind)  # a local folder, a UserError, or None for a hub id
    if path is None:
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(text, allow_patterns=[*_HUB_FILES, *extra_files],
                                          local_files_only=local_files_only))
        except Exception as exc:  # offline, unknown repo, bad id: the same fix for the user
            where = "in the local hub cache (local_files_only)" if local_files_only else "on the hub"
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise UserError(f"cannot get {what} {text!r} {where}: {type(exc).__name__}: {first}; {how}") from None
    with loading_component(what, path):
        missing = _missing_files(path) + [n for n in required_files if not (path / n).is_file()]
    if missing:
        raise UserError(f"incomplete {what} at {path}: missing {', '.join(missing)}; {how}")
    return path


def open_image(image: Any, what: str = "image") -> Any:
    """A PIL RGB image from a PIL image or a path (EXIF rotation applied), or a UserError."""
    from PIL import Image, ImageOps

    if isinstance(image, Image.Image):
        return _to_rgb(image, what)
    if isinstance(image, (str, os.PathLike)):
        input_file(image, what, "give the path of a PNG/JPEG file")  # before opening: a pipe would block
        try:
            with Image.open(image) as opened:
                opened = ImageOps.exif_transpose(opened)
                opened.load()
        except Exception as exc:
            raise UserError(f"cannot read {what} {os.fspath(image)}: {type(exc).__name__}: {exc}; "
                            "give a PNG/JPEG file") from None
        return _to_rgb(opened, f"{what} {os.fspath(image)}")
    raise UserError(f"{what} must be a PIL image or a file path, got {type(image).__name__}")


_WIDE_MODES = ("F", "I", "I;16", "I;16B", "I;16L", "I;16N")  # one channel of 16/32-bit integers or floats


def _to_rgb(image: Any, what: str) -> Any:
    """8-bit RGB of any image; a float or 16/32-bit one by its real range, NaN/Inf refused.

    PIL's own convert clips such values to 0..255 and turns NaN into 0, so a float photo
    in 0..1 came out black and a half-NaN one half black, with no word said.
    """
    from PIL import Image

    if image.mode not in _WIDE_MODES:
        return image.convert("RGB")
    values = np.asarray(image, dtype=np.float64)  # [H, W]
    finite = np.isfinite(values)
    if not finite.all():
        bad = int(values.size - finite.sum())
        raise UserError(f"{what} holds NaN or infinite values in {bad} of its {values.size} pixels "
                        f"({100 * bad / values.size:.0f}%); give an ordinary photo (PNG/JPEG, 8 or 16 bits)")
    lo, hi = float(values.min()), float(values.max())
    if lo >= 0 and hi <= 1 and image.mode == "F":  # a float image in 0..1
        scaled = values * 255.0
    elif lo >= 0 and hi <= 255:
        scaled = values
    elif lo >= 0 and hi <= 65535:  # 16-bit
        scaled = values / 257.0
    else:
        scaled = (values - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(values)
    return Image.fromarray(np.round(scaled).clip(0, 255).astype(np.uint8)).convert("RGB")


def normalize_depth(depth: torch.Tensor) -> Any:
    """Float map [H, W] (larger = nearer) -> 8-bit grey PIL image, min -> 0, max -> 255.

    A constant map carries no depth; it becomes all black rather than dividing by zero.
    NaN/Inf (a model whose weights hold them, or whose dtype overflowed) is an error, not
    a black picture.
    """
    from PIL import Image

    d = depth.detach().to(torch.float64).cpu()  # d: [H, W]
    if not bool(torch.isfinite(d).all()):
        raise NonFiniteError("the depth model's prediction holds NaN/Inf: its weights hold NaN/Inf (re-download "
                             "them), or its dtype overflowed (try depth_estimator.weights=fp32 in the profile)")
    lo, hi = d.min(), d.max()
    scaled = (d - lo) / (hi - lo) * 255.0 if hi > lo else torch.zeros_like(d)
    return Image.fromarray(scaled.round().clamp(0, 255).to(torch.uint8).numpy())  # 2-D uint8 -> mode "L"


def open_hf_model(path_or_id: str | os.PathLike[str], what: str, default_id: str, tiny_kind: str, config_name: str,
                  local_files_only: bool, device: torch.device | str | None,
                  dtype: torch.dtype | None, extra_files: Sequence[str] = (),
                  required_files: Sequence[str] = ()) -> tuple[Path, torch.device, torch.dtype]:
    """The checked folder of a transformers model and the device and dtype it runs in (SAM2, Depth Anything,
    the evaluation's detector and SAM).

    Its config is compared with the bundled real one (config_name) before anything is built.
    """
    folder = resolve_hf_model(path_or_id, what, default_id, local_files_only, tiny_kind=tiny_kind,
                              extra_files=extra_files, required_files=required_files)
    device = torch.device(device) if device is not None else default_device()
    read_component_config(what, folder / "config.json", config_name)
    return folder, device, dtype or default_dtype(device)


@dataclass
class DepthEstimator:
    """A loaded Depth Anything model and its image processor; one per engine, no global state."""

    model: Any
    processor: Any
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike[str] = DEFAULT_DEPTH_MODEL,
                        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                        local_files_only: bool = False) -> "DepthEstimator":
        """Load from a folder or a hub id; missing/incomplete weights raise a UserError with the fix."""
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        folder, device, dtype = open_hf_model(path_or_id, "depth model", DEFAULT_DEPTH_MODEL, "depth",
                                              "depth_anything_v2_large", local_files_only, device, dtype)
        read_json("depth model", folder / "preprocessor_config.json")
        with loading_component("depth model", folder):
            processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        model = checked_from_pretrained("depth model", folder, AutoModelForDepthEstimation, folder, dtype=dtype,
                                        use_safetensors=True, local_files_only=True)
        model.eval().requires_grad_(False).to(device)
        return cls(model=model, processor=processor, device=device, dtype=dtype)

    @torch.inference_mode()
    def predict(self, image: Any, size: Sequence[int] | None = None) -> torch.Tensor:
        """Raw relative inverse depth float32 [H, W] at `size` (w, h) or the image's size."""
        rgb = open_image(image)
        width, height = (int(size[0]), int(size[1])) if size is not None else rgb.size
        if width <= 0 or height <= 0:
            raise UserError(f"depth size must be positive (width, height), got {tuple(size or ())}")
        pixels = self.processor(images=rgb, return_tensors="pt")["pixel_values"]  # [1, 3, h', w']
        out = self.model(pixel_values=pixels.to(self.device, self.dtype))
        pred = out.predicted_depth.float()  # [1, h', w']; bicubic up-sampling in fp32, never bf16
        # Same resize as the processor's post_process_depth_estimation (bicubic, align_corners=False).
        return F.interpolate(pred[:, None], size=(height, width), mode="bicubic", align_corners=False)[0, 0]

    def estimate(self, image: Any, size: Sequence[int] | None = None) -> Any:
        """Grey 8-bit depth (near = bright, stretched to 0..255) at `size` (w, h) or the image's size."""
        return normalize_depth(self.predict(image, size))
