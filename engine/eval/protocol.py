"""The COCO-MIG protocol's numbers, as the reference evaluator fixes them, in one place.

Every value here comes from `eval_mig.py` in LeyRio/MIG_Bench (the evaluator the
MIGC README points to); docs/eval.md says where each one is used there. Changing
one changes the metric, so PROTOCOL_VERSION is part of every cached result's key.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

PROTOCOL_VERSION = 1

EVAL_SIZE = 512  # images are scored at 512 x 512 (resized first when they are not)
BOX_THRESHOLD = 0.25  # a detection is kept when its best token probability is above this
TEXT_THRESHOLD = 0.25  # only picks the words of a detection's label: no effect on the boxes
NMS_IOU = 0.8  # detections overlapping a better one by more than this are dropped
POSITION_IOU = 0.5  # an instance is placed right when the best detection's IoU with its box is at least this
COLOUR_FRACTION = 0.2  # colour right when at least this share of the mask's pixels is in the colour's range
BACKGROUND_GREY = 127  # pixels outside the mask are painted this grey before the HSV test
LEVELS = (2, 3, 4, 5, 6)  # the benchmark's levels: instances per prompt

DEFAULT_DETECTOR = "IDEA-Research/grounding-dino-tiny"  # Grounding DINO Swin-T OGC in transformers
DEFAULT_SEGMENTER = "facebook/sam-vit-huge"  # SAM ViT-H in transformers

# OpenCV 8-bit HSV (H 0..180, S and V 0..255); bounds inclusive, as cv2.inRange. Red wraps around.
HSV_BANDS: Mapping[str, tuple[tuple[tuple[int, int, int], tuple[int, int, int]], ...]] = MappingProxyType({
    "red": (((0, 43, 35), (6, 255, 255)), ((156, 43, 35), (180, 255, 255))),
    "blue": (((78, 43, 35), (124, 255, 255)),),
    "green": (((35, 43, 35), (77, 255, 255)),),
    "yellow": (((20, 43, 35), (34, 255, 255)),),
    "black": (((0, 0, 0), (180, 255, 35)),),
    "white": (((0, 0, 221), (180, 43, 255)),),
    "brown": (((6, 43, 35), (25, 255, 255)),),
})
COLOURS = tuple(HSV_BANDS)

# The 80 COCO classes: COCO-MIG's nouns (what its prompts ask for, one class per instance).
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)

# The name the reference evaluator reads its ground truth from (relative to where it runs).
REFERENCE_TRUTH_NAME = "sample_prompt_color_split.json"


# Published rows to print beside a user's numbers: percent, per level L2..L6 and overall.
# As filed in issue 18 from the 3DIS-FLUX paper (arXiv 2501.05131) and DreamRenderer (arXiv 2503.12885).
PUBLISHED: tuple[Mapping[str, object], ...] = (
    MappingProxyType({"method": "3DIS-FLUX", "source": "3DIS-FLUX paper",
                      "instance_success": (76.4, 68.4, 63.3, 58.1, 58.9, 62.9),
                      "miou": (67.3, 61.2, 56.4, 52.3, 52.7, 56.2), "image_success": None}),
    MappingProxyType({"method": "MIGC", "source": "3DIS-FLUX paper",
                      "instance_success": (None, None, None, None, None, 67.1),
                      "miou": (None, None, None, None, None, 54.7), "image_success": None}),
    MappingProxyType({"method": "3DIS + DreamRenderer", "source": "DreamRenderer paper",
                      "instance_success": (None, None, None, None, None, 71.9),
                      "miou": (None, None, None, None, None, 63.7), "image_success": 37.1}),
)


def settings() -> dict[str, object]:
    """The protocol's values, for the JSON report (what a reader needs to compare runs)."""
    return {
        "reference": "eval_mig.py (LeyRio/MIG_Bench)", "version": PROTOCOL_VERSION, "size": EVAL_SIZE,
        "box_threshold": BOX_THRESHOLD, "text_threshold": TEXT_THRESHOLD, "nms_iou": NMS_IOU,
        "position_iou": POSITION_IOU, "colour_fraction": COLOUR_FRACTION, "background_grey": BACKGROUND_GREY,
        "hsv_bands": {name: [list(map(list, band)) for band in bands] for name, bands in HSV_BANDS.items()},
    }
