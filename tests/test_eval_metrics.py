"""COCO-MIG arithmetic against values worked out by hand from eval_mig.py's rules (docs/eval.md).

No model runs here: a stub detector answers from a table and a stub segmenter returns
the ground-truth box as the mask, on hand-made images (coloured rectangles on grey
127), so every instance's IoU and colour share is known exactly.
"""

from __future__ import annotations

import hashlib
import math
import types
from pathlib import Path

import numpy as np
import pytest

from threedis.engine.eval.boxes import iou_with, nms
from threedis.engine.eval.cache import ResultCache
from threedis.engine.eval.colour import colour_fraction, in_colour, rgb_to_hsv
from threedis.engine.eval.measure import measure_items
from threedis.engine.eval.models import Detections
from threedis.engine.eval.report import build_report, table
from threedis.engine.eval.score import InstanceMeasure, judge
from threedis.engine.eval.sources import EvalItem, Source
from threedis.engine.eval.truth import TruthEntry, TruthInstance, split_phrase

# ---------------------------------------------------------------- HSV as OpenCV computes it


@pytest.mark.parametrize("rgb, hsv", [
    ((255, 0, 0), (0, 255, 255)),  # pure red: hue 0
    ((0, 0, 255), (120, 255, 255)),  # blue: 240 degrees / 2
    ((0, 255, 0), (60, 255, 255)),
    ((255, 0, 64), (172, 255, 255)),  # hue -7.5 degrees: (-64 * 482 + 2048) >> 12 = -8, + 180
    ((150, 75, 0), (15, 255, 150)),  # brown: 75 * 819 -> 15.49 -> 15
    ((128, 128, 128), (0, 0, 128)),  # grey: no saturation, no hue
    ((255, 255, 212), (30, 43, 255)),  # S = 43 * 4096 >> 12, H = 43 * 2858 -> 30.5 -> 30
    ((0, 0, 0), (0, 0, 0)),
])
def test_hsv_matches_hand_worked_opencv_values(rgb, hsv):
    assert tuple(rgb_to_hsv(np.array([rgb], dtype=np.uint8))[0]) == hsv


def test_hsv_equals_opencv_on_a_million_colours():
    cv2 = pytest.importorskip("cv2")
    rgb = np.random.default_rng(0).integers(0, 256, size=(1000, 1000, 3), dtype=np.uint8)
    ours = rgb_to_hsv(rgb)
    theirs = cv2.cvtColor(rgb[..., ::-1].copy(), cv2.COLOR_BGR2HSV).astype(np.int64)
    assert int((ours != theirs).any(axis=-1).sum()) == 0


@pytest.mark.parametrize("rgb, inside", [
    ((255, 0, 0), {"red"}),  # red's first band (H 0..6)
    ((255, 0, 64), {"red"}),  # red's second band (H 156..180)
    ((255, 51, 0), {"red", "brown"}),  # H = 6 exactly: both bands' bound (inclusive)
    ((150, 75, 0), {"brown"}),
    ((0, 0, 255), {"blue"}),
    ((0, 255, 0), {"green"}),
    ((255, 255, 0), {"yellow"}),
    ((255, 255, 212), {"white", "yellow"}),  # S = 43: white's top and yellow's bottom
    ((255, 255, 213), {"white"}),  # S = 42
    ((35, 35, 35), {"black"}),  # V = 35: black's top
    ((36, 36, 36), set()),
    ((35, 0, 0), {"black", "red"}),  # V = 35 and saturated
    ((127, 127, 127), set()),  # the background grey is no colour
])
def test_colour_bands(rgb, inside):
    hsv = rgb_to_hsv(np.array([rgb], dtype=np.uint8))
    found = {c for c in ("red", "blue", "green", "yellow", "black", "white", "brown") if in_colour(hsv, c)[0]}
    assert found == inside


def test_colour_share_counts_mask_pixels_only():
    image = np.full((8, 8, 3), 127, np.uint8)
    image[:2, :] = (255, 0, 0)  # 16 red pixels
    image[2:, :] = (0, 0, 255)
    mask = np.zeros((8, 8), bool)
    mask[:5, :] = True  # 40 pixels: 16 red, 24 blue
    assert colour_fraction(image, mask, "red") == (0.4, 40)
    assert colour_fraction(image, mask, "blue") == (0.6, 40)
    assert colour_fraction(image, np.zeros((8, 8), bool), "red") == (0.0, 0)


# ---------------------------------------------------------------- boxes


def test_iou_and_nms_by_hand():
    gt = np.array([0, 0, 10, 10])
    boxes = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 10, 5]])
    np.testing.assert_allclose(iou_with(boxes, gt), [1.0, 50 / 150, 0.0, 0.5])
    assert iou_with(np.zeros((0, 4)), gt).shape == (0,)
    # A (0.9) keeps; B overlaps A by 0.9 > 0.8: dropped; C by 0.5: kept; D (best score) keeps first.
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 9], [0, 0, 10, 5], [50, 50, 60, 60]])
    assert nms(boxes, np.array([0.9, 0.8, 0.7, 0.95]), 0.8).tolist() == [3, 0, 2]
    # exactly at the threshold: kept (only "more than" suppresses)
    assert nms(np.array([[0, 0, 10, 10], [0, 0, 10, 8]]), np.array([0.9, 0.8]), 0.8).tolist() == [0, 1]


# ---------------------------------------------------------------- the rules


def test_judge_keeps_the_reference_mIoU_quirk():
    right = judge(InstanceMeasure(3, 0.8, 0.5, 100))
    assert (right.position, right.colour, right.success, right.miou) == (True, True, True, 0.8)
    wrong_colour = judge(InstanceMeasure(3, 0.8, 0.1, 100))
    assert (wrong_colour.success, wrong_colour.miou) == (False, 0.0)
    wrong_place = judge(InstanceMeasure(3, 0.3, None, 0))
    assert (wrong_place.position, wrong_place.miou) == (False, 0.3)  # the below-threshold IoU itself
    nothing = judge(InstanceMeasure(0, 0.0, None, 0))
    assert (nothing.position, nothing.miou) == (False, 0.0)
    boundary = judge(InstanceMeasure(1, 0.5, 0.2, 10))
    assert boundary.success and boundary.miou == 0.5  # IoU >= 0.5 and share >= 0.2 are right
    empty_mask = judge(InstanceMeasure(1, 0.9, 0.0, 0))
    assert not empty_mask.success and empty_mask.miou == 0.0


def test_phrases_split_like_the_reference_labels():
    assert split_phrase("a red dog") == ("red", "dog")
    assert split_phrase("blue teddy bear") == ("blue", "teddy bear")
    assert split_phrase("An White dining table") == ("white", "dining table")
    for bad in ("a dog", "a purple dog", "red"):
        with pytest.raises(Exception, match="colour|class"):
            split_phrase(bad)


# ---------------------------------------------------------------- hand-made images, stub models

CELL = 128  # instances sit in 128 px cells of a 4 x 4 grid: boxes and fills land on whole pixels
FILL = {"red": (255, 0, 0), "red2": (255, 0, 64), "blue": (0, 0, 255), "green": (0, 255, 0),
        "yellow": (255, 255, 0), "black": (10, 10, 10), "white": (240, 240, 240), "brown": (150, 75, 0)}
# kind -> (detection IoU or None, share of the cell filled, fill colour: None = the asked colour)
KINDS = {
    "S": (1.0, 1.0, None),  # right: miou 1.0
    "B": (0.5, 0.25, None),  # both at their threshold: right, miou 0.5
    "P": (0.375, 1.0, None),  # misplaced: miou 0.375 (the quirk)
    "N": (None, 1.0, None),  # not detected: miou 0
    "C": (0.75, 1.0, "red"),  # found, wrong colour: miou 0
    "F": (1.0, 0.1875, None),  # found, 18.75% of the mask in colour: wrong, miou 0
    "R": (0.75, 1.0, "red2"),  # red in its second HSV band: right, miou 0.75
}
COLOURS = ["green", "yellow", "white", "black", "brown", "blue"]
LEVELS = {2: "SR", 3: "BPN", 4: "SCFS", 5: "SSSSB", 6: "NNPCFS"}


def scene(level: int):
    """(truth, image, detector answers by noun) for one prompt of `level` instances."""
    image = np.full((512, 512, 3), 127, np.uint8)
    instances, answers = [], {}
    for i, kind in enumerate(LEVELS[level]):
        iou, share, fill = KINDS[kind]
        colour = "red" if kind == "R" else COLOURS[i % len(COLOURS)]
        if kind == "C":
            colour = "blue"
        x0, y0 = (i % 4) * CELL, (i // 4) * CELL
        box = (x0 / 512, y0 / 512, (x0 + CELL) / 512, (y0 + CELL) / 512)
        noun = f"thing{i}"
        instances.append(TruthInstance(colour, noun, box))
        image[y0:y0 + int(CELL * share), x0:x0 + CELL] = FILL[fill or colour]
        answers[noun] = [] if iou is None else [[x0, y0, x0 + CELL, y0 + CELL * iou]]
    return TruthEntry(f"c{level}", f"level {level}", tuple(instances)), image, answers


def _key(image: np.ndarray) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()


class StubDetector:
    def __init__(self, answers_by_image):
        self.answers = answers_by_image
        self.calls = 0

    def detect(self, images, queries):
        self.calls += len(images)
        out = []
        for image, query in zip(images, queries):
            boxes = np.array(self.answers[_key(image)][query], dtype=np.float64).reshape(-1, 4)
            out.append(Detections(boxes=boxes, scores=np.full(len(boxes), 0.9)))
        return out


class BoxSegmenter:
    """The ground-truth box as the mask: the colour share is the share of the cell filled in colour."""

    def masks(self, images, boxes):
        out = []
        for image, per_image in zip(images, boxes):
            masks = []
            for x0, y0, x1, y1 in per_image:
                mask = np.zeros(image.shape[:2], bool)
                mask[int(y0):int(y1), int(x0):int(x1)] = True
                masks.append(mask)
            out.append(masks)
        return out


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mig-scenes")
    made = {}
    from PIL import Image

    for level in LEVELS:
        truth, image, answers = scene(level)
        path = folder / f"scene_{level}.png"
        Image.fromarray(image).save(path)
        made[level] = (truth, path, image, answers)
    return made


def items_for(scenes, seed: str, missing=()):
    return [EvalItem(name=f"L{level}/seed-{seed}", group=seed, truth=truth,
                     image=None if level in missing else path, status="missing" if level in missing else "done")
            for level, (truth, path, _, _) in scenes.items()]


def run_report(scenes, items, cache=None, detector=None):
    detector = detector or StubDetector({_key(img): ans for _, _, img, ans in scenes.values()})
    cache = cache or ResultCache(None, ["stub"])
    results = measure_items(items, lambda: detector, BoxSegmenter, cache, progress=False)
    source = Source(kind="folder", path=Path("scenes"), items=list(items))
    return build_report(source, results, {"detector": "stub", "sam": "box"}), detector


def test_every_level_by_hand(scenes):
    report, _ = run_report(scenes, items_for(scenes, "0"))
    pooled = report["pooled"]
    # successes / instances, mIoU sum / instances, images with every instance right (worked out per KINDS):
    expected = {  # level: (successes, miou sum, image success)
        "L2": (2, 1.0 + 0.75, 1), "L3": (1, 0.5 + 0.375 + 0.0, 0), "L4": (2, 1.0 + 0 + 0 + 1.0, 0),
        "L5": (5, 4 * 1.0 + 0.5, 1), "L6": (1, 0 + 0 + 0.375 + 0 + 0 + 1.0, 0)}
    for level, (successes, miou_sum, image_ok) in expected.items():
        n = int(level[1:])
        row = pooled[level]
        assert (row["instances"], row["evaluated"], row["missing"], row["successes"]) == (n, n, 0, successes)
        assert row["instance_success"] == pytest.approx(successes / n)
        assert row["miou"] == pytest.approx(miou_sum / n)
        assert row["image_success"] == image_ok
    overall = pooled["overall"]
    assert (overall["instances"], overall["successes"]) == (20, 11)
    assert overall["instance_success"] == pytest.approx(0.55)  # weighted by instances, not a mean of levels
    assert overall["miou"] == pytest.approx(10.5 / 20)
    assert overall["image_success"] == pytest.approx(2 / 5)
    assert report["items"] == {"expected": 5, "evaluated": 5, "failed": 0, "missing": 0, "unreadable": 0}


def test_missing_images_stay_in_the_denominator_and_seeds_give_a_spread(scenes, tmp_path):
    cache = ResultCache(tmp_path / "cache.jsonl", ["stub"])
    items = items_for(scenes, "0") + items_for(scenes, "1", missing={5})
    report, detector = run_report(scenes, items, cache=cache)
    seed1 = report["per_seed"]["1"]
    assert seed1["L5"]["instances"] == 5 and seed1["L5"]["evaluated"] == 0 and seed1["L5"]["missing"] == 5
    assert seed1["overall"]["instance_success"] == pytest.approx(6 / 20)  # the 5 missing count as failures
    assert seed1["overall"]["instance_success_evaluated"] == pytest.approx(6 / 15)
    assert seed1["overall"]["miou"] == pytest.approx(6.0 / 20)
    assert seed1["overall"]["image_success"] == pytest.approx(1 / 5)
    spread = report["mean_over_seeds"]["overall"]["instance_success"]
    assert spread["mean"] == pytest.approx((0.55 + 0.3) / 2)
    assert spread["std"] == pytest.approx(0.25 / math.sqrt(2))  # sample std of (0.55, 0.3)
    assert report["pooled"]["overall"]["instance_success"] == pytest.approx(17 / 40)
    assert report["items"]["missing"] == 1
    assert report["not_evaluated"] == [{"item": "L5/seed-1", "status": "missing", "why": "not scored"}]
    text = table(report)
    assert "std over seeds" in text and "62.9" in text and "count as failures" in text
    # Seed 1's images are seed 0's files: measured once, then from the cache; a fresh cache object
    # reads the file back and needs no model at all.
    assert detector.calls == sum(len(truth.instances) for truth, *_ in scenes.values())  # seed 0's pairs only
    again = ResultCache(tmp_path / "cache.jsonl", ["stub"])

    def no_model():
        raise AssertionError("a cached evaluation must not load a model")

    results = measure_items(items, no_model, no_model, again, progress=False)
    assert build_report(Source("folder", Path("scenes"), items), results, {"detector": "stub", "sam": "box"}) \
        ["pooled"] == report["pooled"]
    other = ResultCache(tmp_path / "cache.jsonl", ["other models"])  # other models: nothing cached for them
    assert other.entries == {}


def test_a_cache_line_torn_by_a_crash_costs_only_itself(tmp_path):
    from threedis.engine.eval.score import InstanceMeasure

    path = tmp_path / "cache.jsonl"
    first = ResultCache(path, ["stub"])
    measure = [InstanceMeasure(detections=1, best_iou=0.75, colour_share=0.5, mask_pixels=40)]
    first.put("a:1", measure)
    first.close()
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"key": "b:1", "models": ["stu')  # the process died mid-line
    second = ResultCache(path, ["stub"])
    second.put("c:1", measure)
    second.close()
    assert set(ResultCache(path, ["stub"]).entries) == {"a:1", "c:1"}


def test_a_changed_image_is_not_scored(scenes, tmp_path):
    truth, path, _, _ = scenes[2]
    item = EvalItem("x/seed-0", "0", truth, path, "done", sha256="0" * 64)
    results = measure_items([item], lambda: None, lambda: None, ResultCache(None, []), progress=False)
    assert "changed since the batch wrote it" in results["x/seed-0"]


# ---------------------------------------------------------------- the real models' post-processing


def test_grounding_dino_keeps_boxes_above_the_threshold_in_pixels():
    """Scores are the best token probability, kept when > 0.25; (cx, cy, w, h) in 0..1 -> pixels; NMS at 0.8."""
    import torch

    from threedis.engine.eval.models import GroundingDino, _Normalise

    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    logits = torch.full((1, 4, 6), -20.0)
    logits[0, 0, 1], logits[0, 1, 2], logits[0, 2, 1], logits[0, 3, 3] = logit(0.9), logit(0.26), logit(0.24), \
        logit(0.8)
    boxes = torch.tensor([[[0.5, 0.5, 0.5, 0.5], [0.25, 0.25, 0.5, 0.5], [0.5, 0.5, 0.1, 0.1],
                           [0.5, 0.5, 0.5, 0.45]]])  # the last overlaps the first by 0.9: suppressed
    calls = []

    def model(**inputs):
        calls.append(inputs)
        return types.SimpleNamespace(logits=logits, pred_boxes=boxes)

    def tokenizer(texts, return_tensors):
        calls.append(texts)
        return {"input_ids": torch.ones(1, 6, dtype=torch.long)}

    detector = GroundingDino(model, tokenizer, side=32, normalise=_Normalise(), device=torch.device("cpu"),
                             batch_size=4)
    (found,) = detector.detect([np.zeros((512, 512, 3), np.uint8)], ["Teddy Bear"])
    assert calls[0] == ["teddy bear."] and calls[1]["pixel_values"].shape == (1, 3, 32, 32)
    np.testing.assert_allclose(found.scores, [0.9, 0.26], rtol=1e-5)
    np.testing.assert_allclose(found.boxes, [[128, 128, 384, 384], [0, 0, 256, 256]], atol=1e-3)


def test_sam_takes_the_best_of_three_masks_of_the_scaled_box():
    import torch

    from threedis.engine.eval.models import SamViT, _Normalise

    calls = []

    class FakeSam:
        def get_image_embeddings(self, pixels):
            calls.append(pixels.shape)
            return torch.zeros(pixels.shape[0], 2, 4, 4)

        def __call__(self, image_embeddings, input_boxes, multimask_output):
            calls.append((input_boxes.clone(), multimask_output))
            masks = torch.full((1, 1, 3, 16, 16), -5.0)
            masks[0, 0, 1, :8, :8] = 5.0  # the second mask: the top-left quarter
            return types.SimpleNamespace(pred_masks=masks, iou_scores=torch.tensor([[[0.2, 0.9, 0.5]]]))

    sam = SamViT(FakeSam(), longest=64, pad=(64, 64), normalise=_Normalise(), device=torch.device("cpu"),
                 batch_size=2)
    out = sam.masks([np.zeros((512, 512, 3), np.uint8)] * 2, [[[64.0, 128.0, 256.0, 512.0]], []])
    assert calls[0] == (1, 3, 64, 64)  # only the image with a box is embedded
    np.testing.assert_allclose(calls[1][0].numpy(), [[[8.0, 16.0, 32.0, 64.0]]])  # 512 px -> 64 px input
    assert calls[1][1] is True and out[1] == []
    mask = out[0][0]
    # the chosen mask's positive quarter, up-sampled 16 -> 64 -> 512: its edges cross zero at 256 px
    assert mask.shape == (512, 512) and mask[:250, :128].all() and mask[:128, :250].all()
    assert not mask[262:, :].any() and not mask[:, 262:].any()


def test_a_batch_that_runs_out_of_memory_is_run_again_in_halves():
    """SAM ViT-H's default batch suits a large card; on a small one the batch halves until it fits."""
    import torch

    from threedis import UserError
    from threedis.engine.eval.models import SamViT, _Normalise

    embedded = []

    class SamThatFitsTwo:
        def get_image_embeddings(self, pixels):
            if pixels.shape[0] > 2:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
            embedded.append(pixels.shape[0])
            return torch.zeros(pixels.shape[0], 2, 4, 4)

        def __call__(self, image_embeddings, input_boxes, multimask_output):
            masks = torch.full((1, 1, 3, 16, 16), 5.0)
            return types.SimpleNamespace(pred_masks=masks, iou_scores=torch.tensor([[[0.2, 0.9, 0.5]]]))

    sam = SamViT(SamThatFitsTwo(), longest=64, pad=(64, 64), normalise=_Normalise(), device=torch.device("cpu"),
                 batch_size=8)
    images, boxes = [np.zeros((512, 512, 3), np.uint8)] * 7, [[[0.0, 0.0, 512.0, 512.0]]] * 7
    out = sam.masks(images, boxes)
    assert embedded == [2, 2, 2, 1] and sam.batch_size == 2  # 8 -> 4 -> 2, then kept
    assert [len(m) for m in out] == [1] * 7 and all(m[0].all() for m in out)

    class SamThatFitsNone(SamThatFitsTwo):
        def get_image_embeddings(self, pixels):
            raise torch.OutOfMemoryError("CUDA out of memory")

    sam = SamViT(SamThatFitsNone(), longest=64, pad=(64, 64), normalise=_Normalise(), device=torch.device("cpu"),
                 batch_size=4)
    with pytest.raises(UserError, match="out of memory with one image at a time"):
        sam.masks(images[:1], boxes[:1])
