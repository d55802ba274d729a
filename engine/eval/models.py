"""The evaluation's two models through transformers: Grounding DINO finds boxes, SAM cuts the instance out.

The reference evaluator runs the authors' GroundingDINO code (Swin-T OGC) and
segment_anything (ViT-H); transformers holds conversions of the same weights
(IDEA-Research/grounding-dino-tiny, facebook/sam-vit-huge), a library users of this
project already have. Preprocessing is done here with PIL and torch from each
checkpoint's preprocessor_config.json, as the original predictors do it (the fast
transformers processors need torchvision, which this project does not depend on):

- detector: the 512 px image resized (bilinear) so its short side is `shortest_edge`
  (800), ImageNet-normalised; the query lower-cased and ended with '.'; a box kept
  when its best token probability is above BOX_THRESHOLD, then NMS at NMS_IOU;
- SAM: resized (bilinear) so the long side is `longest_edge` (1024), normalised,
  zero-padded to `pad_size`; prompted with the ground-truth box, three masks, the one
  with the best predicted IoU; its logits up-sampled to the padded size, cropped,
  up-sampled to 512 px, thresholded at 0.

Both run in batches (image-and-class pairs whose captions have the same number
of tokens together for the detector, image embeddings for SAM) on the GPU when there is one, in float32 like the
reference.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from threedis import UserError
from threedis.engine.eval.boxes import nms
from threedis.engine.eval.protocol import (
    BOX_THRESHOLD, DEFAULT_DETECTOR, DEFAULT_SEGMENTER, EVAL_SIZE, NMS_IOU,
)
from threedis.engine.offload import release_memory
from threedis.engine.sam_masks import IMAGENET_MEAN, IMAGENET_STD, normalised_pixels

# The detector's BERT tokenizer: fetched with the model; tokenizer_config.json must be there.
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.txt", "special_tokens_map.json")


@dataclass(frozen=True)
class Detections:
    """Boxes [N, 4] (x0, y0, x1, y1 in pixels of the EVAL_SIZE image) and scores [N], after NMS."""

    boxes: np.ndarray
    scores: np.ndarray


class Detector(Protocol):
    """Finds queries[i] in images[i] (uint8 RGB [EVAL_SIZE, EVAL_SIZE, 3]); the real one or a test stub."""

    def detect(self, images: Sequence[np.ndarray], queries: Sequence[str]) -> list[Detections]: ...


class Segmenter(Protocol):
    """One bool mask [EVAL_SIZE, EVAL_SIZE] per pixel box, per image."""

    def masks(self, images: Sequence[np.ndarray], boxes: Sequence[Sequence[Sequence[float]]]) -> list[list[np.ndarray]]:
        ...


def model_ident(path_or_id: str | os.PathLike[str]) -> str:
    """What a cached result names its model by: a hub id as given; a local folder by path, config and weights' stat.

    Known before anything loads, so a fully cached evaluation loads no model at all.
    """
    text = os.fspath(path_or_id)
    folder = Path(text).expanduser()
    if not folder.is_dir():
        return text
    digest = hashlib.sha256()
    for file in sorted(folder.glob("*.json")) + sorted(folder.glob("*.safetensors")):
        try:
            stat = file.stat()
            digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
            if file.suffix == ".json" and stat.st_size < 1 << 20:
                digest.update(file.read_bytes())
        except OSError:
            continue
    return f"{folder.resolve()}@{digest.hexdigest()[:12]}"


@dataclass(frozen=True)
class _Normalise:
    """Rescale and ImageNet statistics from a preprocessor_config.json."""

    rescale: float = 1 / 255
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    @classmethod
    def from_config(cls, cfg: dict[str, Any], what: str = "model") -> "_Normalise":
        try:
            return cls(float(cfg.get("rescale_factor", 1 / 255)), tuple(map(float, cfg.get("image_mean", IMAGENET_MEAN))),
                       tuple(map(float, cfg.get("image_std", IMAGENET_STD))))
        except (ValueError, TypeError, AttributeError) as exc:
            raise UserError(f"{what}: bad preprocessor setting ({exc}); restore the original "
                            f"preprocessor_config.json") from None

    def __call__(self, rgb: np.ndarray, width: int, height: int) -> torch.Tensor:
        """uint8 [h, w, 3] -> float32 [3, height, width], resized with PIL's bilinear filter."""
        from PIL import Image

        return normalised_pixels(Image.fromarray(rgb), width, height, self.rescale, self.mean, self.std)


def _settings(what: str, folder: Path) -> dict[str, Any]:
    from threedis.engine.config_check import read_json

    return read_json(what, folder / "preprocessor_config.json")


def _size(cfg: dict[str, Any], key: str, what: str, file: Path | str) -> int:
    size = cfg.get("size") or {}
    value = size.get(key) if isinstance(size, dict) else None
    if not isinstance(value, int) or isinstance(value, bool) or not 16 <= value <= 4096:
        raise UserError(f"{what}: {file}: size.{key} must be a whole number of pixels, got {value!r}; restore the "
                        f"original file")
    return value


def _load(what: str, folder: Path, cls: Any, dtype: torch.dtype, device: torch.device) -> Any:
    from threedis.engine.loading import checked_from_pretrained

    model = checked_from_pretrained(what, folder, cls, folder, dtype=dtype, use_safetensors=True,
                                    local_files_only=True)
    return model.eval().requires_grad_(False).to(device)


def in_batches(owner: Any, rows: list[int], run: Callable[[list[int]], None]) -> None:
    """run(chunk) over rows in chunks of owner.batch_size; a chunk that runs out of GPU memory is run again
    in halves, and the smaller size is kept.

    Why: the default batches suit a large card (SAM ViT-H's global attention alone is about 1 GB
    per image in fp32), and a 12-16 GB card would otherwise stop on the first batch.
    """
    start = 0
    while start < len(rows):
        chunk = rows[start:start + owner.batch_size]
        try:
            run(chunk)
        except torch.OutOfMemoryError:
            if len(chunk) == 1:
                raise UserError(f"{type(owner).__name__}: out of memory with one image at a time on {owner.device}; "
                                f"close what else uses that GPU, or pass --device for another") from None
            owner.batch_size = (len(chunk) + 1) // 2
            release_memory(owner.device)  # the failed batch's tensors too, before the halves run
            continue
        start += len(chunk)


# ---------------------------------------------------------------- the detector


class GroundingDino:
    """Grounding DINO (transformers GroundingDinoForObjectDetection) with the protocol's thresholds and NMS."""

    def __init__(self, model: Any, tokenizer: Any, side: int, normalise: _Normalise, device: torch.device,
                 batch_size: int) -> None:
        self.model, self.tokenizer, self.side, self.normalise = model, tokenizer, side, normalise
        self.device, self.batch_size = device, max(1, batch_size)

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike[str] = DEFAULT_DETECTOR,
                        device: torch.device | str | None = None, local_files_only: bool = False,
                        batch_size: int = 8) -> "GroundingDino":
        """Load from a folder or hub id; a missing or broken file is one UserError saying which and what to do."""
        from transformers import AutoTokenizer, GroundingDinoForObjectDetection

        from threedis.engine.depth_estimation import open_hf_model
        from threedis.engine.loading import loading_component

        what = "detector (Grounding DINO)"
        folder, device, dtype = open_hf_model(path_or_id, what, DEFAULT_DETECTOR, "grounding-dino",
                                              "grounding_dino_tiny", local_files_only, device, torch.float32,
                                              extra_files=TOKENIZER_FILES, required_files=TOKENIZER_FILES[:1])
        cfg = _settings(what, folder)
        side = cls._side(cfg, what, folder / "preprocessor_config.json")  # checked before the weights load
        normalise = _Normalise.from_config(cfg, what)
        with loading_component(what, folder):
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = _load(what, folder, GroundingDinoForObjectDetection, dtype, device)
        return cls(model, tokenizer, side, normalise, device, batch_size)

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, preprocessor: dict[str, Any], device: torch.device | str,
                   batch_size: int = 8) -> "GroundingDino":
        """A model already built and placed (bench/eval_mig.py --random-real), read as from_pretrained reads one."""
        side = cls._side(preprocessor, "detector (Grounding DINO)", "its preprocessor settings")
        return cls(model, tokenizer, side, _Normalise.from_config(preprocessor), torch.device(device),
                   batch_size)

    @staticmethod
    def _side(cfg: dict[str, Any], what: str, file: Path | str) -> int:
        """Square EVAL_SIZE images: the short side goes to shortest_edge unless the long side would pass
        longest_edge."""
        size = cfg.get("size") or {}
        shortest = _size(cfg, "shortest_edge", what, file)
        longest = size.get("longest_edge", shortest) if isinstance(size, dict) else shortest
        return min(shortest, int(longest)) if isinstance(longest, int) else shortest

    @staticmethod
    def caption(query: str) -> str:
        """The text Grounding DINO is given: lower case, ending with '.' (its own preprocessing)."""
        text = query.lower().strip()
        return text if text.endswith(".") else text + "."

    @torch.inference_mode()
    def detect(self, images: Sequence[np.ndarray], queries: Sequence[str]) -> list[Detections]:
        """Detections of queries[i] in images[i].

        Pairs whose captions have the same number of tokens share a batch: no padding, so
        each row is computed exactly as if it ran alone (the reference's one image, one class).
        """
        tokens = [self.tokenizer([self.caption(q)], return_tensors="pt") for q in queries]
        by_length: dict[int, list[int]] = {}
        for i, tok in enumerate(tokens):
            by_length.setdefault(int(tok["input_ids"].shape[1]), []).append(i)
        pixels: dict[int, torch.Tensor] = {}  # one normalised copy per image
        out: list[Detections | None] = [None] * len(images)

        def run(chunk: list[int]) -> None:
            for i in chunk:
                if id(images[i]) not in pixels:
                    pixels[id(images[i])] = self.normalise(images[i], self.side, self.side)
            batch = torch.stack([pixels[id(images[i])] for i in chunk]).to(self.device)  # [B, 3, S, S]
            mask = torch.ones(len(chunk), self.side, self.side, dtype=torch.long, device=self.device)  # no padding
            text = {k: torch.cat([tokens[i][k] for i in chunk]).to(self.device) for k in tokens[chunk[0]]}
            result = self.model(pixel_values=batch, pixel_mask=mask, **text)
            scores = result.logits.float().sigmoid().amax(dim=-1).cpu().numpy()  # [B, queries]
            boxes = result.pred_boxes.float().cpu().numpy()  # [B, queries, 4]: (cx, cy, w, h) in 0..1
            for i, score, box in zip(chunk, scores, boxes):
                out[i] = self._kept(score, box)

        for rows in by_length.values():
            in_batches(self, rows, run)
        return out  # type: ignore[return-value]

    @staticmethod
    def _kept(score: np.ndarray, box: np.ndarray) -> Detections:
        """Boxes above BOX_THRESHOLD, in pixels of the EVAL_SIZE image, after NMS."""
        keep = score > BOX_THRESHOLD
        cx, cy, w, h = (box[keep] * EVAL_SIZE).T
        xyxy = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1).reshape(-1, 4)
        kept = nms(xyxy, score[keep], NMS_IOU)
        return Detections(boxes=xyxy[kept], scores=score[keep][kept])


# ---------------------------------------------------------------- SAM


class SamViT:
    """SAM (transformers SamModel) prompted with boxes: the best of three masks per box."""

    def __init__(self, model: Any, longest: int, pad: tuple[int, int], normalise: _Normalise, device: torch.device,
                 batch_size: int) -> None:
        self.model, self.longest, self.pad, self.normalise = model, longest, pad, normalise
        self.device, self.batch_size = device, max(1, batch_size)

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike[str] = DEFAULT_SEGMENTER,
                        device: torch.device | str | None = None, local_files_only: bool = False,
                        batch_size: int = 4) -> "SamViT":
        from transformers import SamModel

        from threedis.engine.depth_estimation import open_hf_model

        what = "SAM model"
        folder, device, dtype = open_hf_model(path_or_id, what, DEFAULT_SEGMENTER, "sam-vit", "sam_vit_huge",
                                              local_files_only, device, torch.float32)
        cfg = _settings(what, folder)
        longest, pad_hw = cls._geometry(cfg, what, folder / "preprocessor_config.json")  # before the weights load
        normalise = _Normalise.from_config(cfg, what)
        model = _load(what, folder, SamModel, dtype, device)
        return cls(model, longest, pad_hw, normalise, device, batch_size)

    @classmethod
    def from_model(cls, model: Any, preprocessor: dict[str, Any], device: torch.device | str,
                   batch_size: int = 4) -> "SamViT":
        """A model already built and placed (bench/eval_mig.py --random-real), read as from_pretrained reads one."""
        longest, pad_hw = cls._geometry(preprocessor, "SAM model", "its preprocessor settings")
        return cls(model, longest, pad_hw, _Normalise.from_config(preprocessor), torch.device(device),
                   batch_size)

    @staticmethod
    def _geometry(cfg: dict[str, Any], what: str, file: Path | str) -> tuple[int, tuple[int, int]]:
        """(longest_edge, padded (height, width)): the resize and the zero padding before the image encoder."""
        longest = _size(cfg, "longest_edge", what, file)
        pad = cfg.get("pad_size") or {}
        pad_hw = (int(pad.get("height", longest)), int(pad.get("width", longest))) if isinstance(pad, dict) \
            else (longest, longest)
        return longest, pad_hw

    @torch.inference_mode()
    def masks(self, images: Sequence[np.ndarray], boxes: Sequence[Sequence[Sequence[float]]]) -> list[list[np.ndarray]]:
        """Per image, one bool [EVAL_SIZE, EVAL_SIZE] mask per pixel box; images without boxes are skipped."""
        out: list[list[np.ndarray]] = [[] for _ in images]
        todo = [i for i, b in enumerate(boxes) if len(b)]
        scale = self.longest / EVAL_SIZE
        side = int(EVAL_SIZE * scale + 0.5)  # the resized image, before padding

        def run(chunk: list[int]) -> None:
            pixels = torch.stack([self.normalise(images[i], side, side) for i in chunk])  # [B, 3, side, side]
            pixels = F.pad(pixels, (0, self.pad[1] - side, 0, self.pad[0] - side)).to(self.device)
            embeddings = self.model.get_image_embeddings(pixels)
            for row, i in enumerate(chunk):
                prompt = torch.tensor([list(map(float, b)) for b in boxes[i]], dtype=torch.float32) * scale
                result = self.model(image_embeddings=embeddings[row:row + 1], input_boxes=prompt[None].to(self.device),
                                    multimask_output=True)
                low = result.pred_masks[0].float()  # [N, 3, h, w] logits
                best = result.iou_scores[0].float().argmax(dim=-1)  # [N]
                chosen = low[torch.arange(low.shape[0]), best][:, None]  # [N, 1, h, w]
                padded = F.interpolate(chosen, size=self.pad, mode="bilinear", align_corners=False)
                full = F.interpolate(padded[..., :side, :side], size=(EVAL_SIZE, EVAL_SIZE), mode="bilinear",
                                     align_corners=False)
                out[i] = list((full[:, 0] > 0).cpu().numpy())

        in_batches(self, todo, run)
        return out

