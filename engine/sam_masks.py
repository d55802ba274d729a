"""SAM2 mask enhancement: tighter instance regions from each box on the depth map (SPEC 7).

Why: a box also covers background, so with box regions an instance's text leaks
into the corners of its box. SAM2, prompted with the box on the depth image, returns
the object's silhouette; the attention rule then uses that mask instead of the box.

Runs transformers' Sam2Model (one forward for all boxes, `multimask_output=False`).
The image/box preprocessing and mask post-processing follow Sam2Processor's
(resize to the model size, ImageNet normalisation, boxes scaled per axis, bilinear
mask up-sampling, threshold 0) but are done here with PIL and torch, because
Sam2ImageProcessor cannot be instantiated without torchvision, which this project
does not depend on. The sizes and statistics are read from the checkpoint's
preprocessor_config.json, so the real and the tiny checkpoints behave alike.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch
import torch.nn.functional as F

from threedis.engine.depth_estimation import open_hf_model, open_image
from threedis.engine.errors import UserError
from threedis.engine.config_check import read_json
from threedis.engine import model_paths
from threedis.engine.loading import checked_from_pretrained

__all__ = [
    "DEFAULT_SAM_MODEL",
    "Masker",
    "SamMasker",
    "SamPreprocess",
    "boxes_to_pixels",
    "enhance_regions",
    "token_regions",
]

DEFAULT_SAM_MODEL = model_paths.DEFAULT_SAM_MODEL

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # what SAM, SAM2 and Grounding DINO's preprocessors normalise with
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalised_pixels(image: Any, width: int, height: int, rescale: float, mean: Sequence[float],
                      std: Sequence[float]) -> torch.Tensor:
    """PIL RGB -> float32 [3, height, width]: bilinear resize (PIL's, as transformers' image processors),
    rescale, then (x - mean) / std per channel. The one such step for every model that sees pixels."""
    import numpy as np
    from PIL import Image

    resized = image.resize((width, height), Image.Resampling.BILINEAR)  # the same size: an exact copy
    x = torch.from_numpy(np.asarray(resized, dtype=np.float32).copy()).permute(2, 0, 1)  # x: [3, h, w]
    return (x * rescale - torch.tensor(mean, dtype=torch.float32)[:, None, None]) \
        / torch.tensor(std, dtype=torch.float32)[:, None, None]


class Masker(Protocol):
    """Anything that turns pixel boxes on an image into one boolean mask each (SamMasker, test stubs)."""

    def masks(self, image: Any, boxes_px: Sequence[Sequence[int]]) -> list[torch.Tensor]: ...


def boxes_to_pixels(boxes_norm: Sequence[Sequence[float]], width: int, height: int) -> list[tuple[int, int, int, int]]:
    """Normalised (x0, y0, x1, y1) -> pixel boxes: floor for x0/y0, ceil for x1/y1 (SPEC 7), clipped to the image.

    Products are rounded to 1e-9 px first: 0.07 * 100 is 7.000000000000001 in floats,
    and a box written as 0.07 means pixel 7, not 8.
    """
    def floor(v: float, n: int) -> int:
        return min(max(math.floor(round(v * n, 9)), 0), n)

    def ceil(v: float, n: int) -> int:
        return min(max(math.ceil(round(v * n, 9)), 0), n)

    out = []
    for box in boxes_norm:
        x0, y0, x1, y1 = (float(v) for v in box)
        out.append((floor(x0, width), floor(y0, height), ceil(x1, width), ceil(y1, height)))
    return out


@dataclass(frozen=True)
class SamPreprocess:
    """The parts of SAM2's preprocessor_config.json that the forward pass depends on."""

    width: int = 1024
    height: int = 1024
    rescale_factor: float = 1 / 255
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @classmethod
    def from_file(cls, file: Path) -> "SamPreprocess":
        cfg = read_json("SAM2 model", file)  # unreadable or not JSON: one line saying which
        try:
            size = cfg.get("size") or {}
            return cls(
                width=int(size.get("width", size.get("longest_edge", 1024))),
                height=int(size.get("height", size.get("longest_edge", 1024))),
                rescale_factor=float(cfg.get("rescale_factor", 1 / 255)),
                mean=tuple(float(v) for v in cfg.get("image_mean", IMAGENET_MEAN)),
                std=tuple(float(v) for v in cfg.get("image_std", IMAGENET_STD)),
            )
        except (ValueError, TypeError, AttributeError) as exc:
            raise UserError(f"SAM2 model: {file}: bad preprocessor setting ({exc}); restore the original file") \
                from None

    def pixels(self, rgb: Any) -> torch.Tensor:
        """PIL RGB -> normalised float32 [1, 3, height, width] (bilinear resize, as Sam2ImageProcessor)."""
        return normalised_pixels(rgb, self.width, self.height, self.rescale_factor, self.mean, self.std)[None]

    def boxes(self, boxes_px: Sequence[Sequence[int]], width: int, height: int) -> torch.Tensor:
        """Pixel boxes on a (width x height) image -> float32 [1, N, 4] in model-input pixels."""
        scale = torch.tensor([self.width / width, self.height / height] * 2, dtype=torch.float32)
        return (torch.tensor([list(map(float, b)) for b in boxes_px], dtype=torch.float32) * scale)[None]


@dataclass
class SamMasker:
    """A loaded Sam2Model plus its preprocessing; one per engine, no global state."""

    model: Any
    prep: SamPreprocess
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike[str] = DEFAULT_SAM_MODEL,
                        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                        local_files_only: bool = False) -> "SamMasker":
        """Load from a folder or a hub id; missing/incomplete weights raise a UserError with the fix."""
        from transformers import Sam2Model

        folder, device, dtype = open_hf_model(path_or_id, "SAM2 model", DEFAULT_SAM_MODEL, "sam2", "sam2_hiera_large",
                                              local_files_only, device, dtype)
        prep = SamPreprocess.from_file(folder / "preprocessor_config.json")
        model = checked_from_pretrained("SAM2 model", folder, Sam2Model, folder, dtype=dtype, use_safetensors=True,
                                        local_files_only=True)
        model.eval().requires_grad_(False).to(device)
        return cls(model=model, prep=prep, device=device, dtype=dtype)

    @torch.inference_mode()
    def masks(self, image: Any, boxes_px: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """One BoolTensor[H, W] per pixel box (x0, y0, x1, y1) on `image` (PIL, already at the output size)."""
        if not boxes_px:
            return []
        rgb = open_image(image, "depth image")
        width, height = rgb.size
        pixels = self.prep.pixels(rgb).to(self.device, self.dtype)  # [1, 3, S, S]
        boxes = self.prep.boxes(boxes_px, width, height).to(self.device)  # [1, N, 4]; fp32: coords stay exact
        out = self.model(pixel_values=pixels, input_boxes=boxes, multimask_output=False)
        low = out.pred_masks[0, :, 0].float()  # [N, S/4, S/4] logits
        # As Sam2Processor.post_process_masks: bilinear to the image size, then logit > 0.
        full = F.interpolate(low[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
        return list((full > 0).cpu().unbind(0))  # N x [H, W] bool


def _user_mask(mask: Any, width: int, height: int, index: int) -> torch.Tensor:
    """A user mask (PIL or tensor) as float32 [H, W] in [0, 1] at the output size (bilinear)."""
    from PIL import Image

    if isinstance(mask, Image.Image):
        import numpy as np

        grey = mask.convert("L")
        t = torch.from_numpy(np.asarray(grey, dtype=np.float32).copy()) / 255.0  # [h, w]
    else:
        t = torch.as_tensor(mask).to(torch.float32)
        if t.dim() != 2:
            raise UserError(f"mask of instance {index} has shape {tuple(t.shape)}; give a 2-D (height, width) mask")
    if tuple(t.shape) != (height, width):
        t = F.interpolate(t[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
    return t


def enhance_regions(layout: Any, depth_image: Any, masker: Masker | None,
                    user_masks: Sequence[Any | None] | None = None) -> list[torch.Tensor | None]:
    """Per-instance masks at the output size (layout.width x layout.height); None means "use the box".

    - an instance with a user mask keeps it (resized to the output size, float 0..1); SAM is not asked;
    - the others get SAM2's mask of their box on the depth image, resized to the output size first so
      mask and image agree (SPEC 7); all of them in one masker call;
    - without a masker, or when SAM returns an empty mask, the instance falls back to its box
      (an empty region would silently drop the instance from the image).
    """
    n = len(layout.instances)
    width, height = int(layout.width), int(layout.height)
    given = list(user_masks) if user_masks is not None else [None] * n
    if len(given) != n:
        raise UserError(f"got {len(given)} user masks for {n} instances; give one entry (or None) per instance")
    out: list[torch.Tensor | None] = [
        None if m is None else _user_mask(m, width, height, i) for i, m in enumerate(given)]
    todo = [i for i in range(n) if given[i] is None]
    if masker is None or not todo:
        return out
    from PIL import Image

    depth = open_image(depth_image, "depth image")
    if depth.size != (width, height):
        depth = depth.resize((width, height), Image.Resampling.BILINEAR)
    boxes = boxes_to_pixels([layout.instances[i].box for i in todo], width, height)
    found = masker.masks(depth, boxes)
    if len(found) != len(todo):
        raise RuntimeError(f"masker returned {len(found)} masks for {len(todo)} boxes")
    for i, mask in zip(todo, found):
        out[i] = mask if bool(mask.any()) else None
    return out


def token_regions(layout: Any, masks: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """BoolTensor[N, h, w] on the token grid: mask_regions where a mask is given, box_regions elsewhere."""
    from threedis.kernels.rule import box_regions, mask_regions

    grid_h, grid_w = layout.grid
    regions = box_regions(layout.boxes, grid_h, grid_w)
    with_mask = [i for i, m in enumerate(masks) if m is not None]
    if with_mask:
        regions[with_mask] = mask_regions([masks[i] for i in with_mask], grid_h, grid_w)
    return regions
