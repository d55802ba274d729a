"""Box overlap as the reference evaluator measures it: pixel (x0, y0, x1, y1) boxes, no +1, greedy NMS."""

from __future__ import annotations

import numpy as np


def iou_with(boxes: np.ndarray, box: np.ndarray) -> np.ndarray:
    """IoU [N] of each of `boxes` [N, 4] with `box` [4]; a pair with no area at all has IoU 0."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    box = np.asarray(box, dtype=np.float64)
    iw = np.maximum(np.minimum(boxes[:, 2], box[2]) - np.maximum(boxes[:, 0], box[0]), 0.0)
    ih = np.maximum(np.minimum(boxes[:, 3], box[3]) - np.maximum(boxes[:, 1], box[1]), 0.0)
    inter = iw * ih
    union = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) + (box[2] - box[0]) * (box[3] - box[1]) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression, best score first (as torchvision.ops.nms).

    A box is dropped when its IoU with a kept, better-scoring box is above `iou_threshold`.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    keep: list[int] = []
    alive = np.ones(len(order), dtype=bool)
    for rank, index in enumerate(order):
        if not alive[rank]:
            continue
        keep.append(int(index))
        rest = order[rank + 1:]
        alive[rank + 1:] &= iou_with(boxes[rest], boxes[index]) <= iou_threshold
    return np.asarray(keep, dtype=np.int64)
