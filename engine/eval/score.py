"""From what the models measured to the benchmark's numbers: per instance, per level, per seed.

An instance is measured once (best detection IoU, colour share of its mask) and
judged by the reference evaluator's rules:

- position right when some detection overlaps its box with IoU >= POSITION_IOU;
- colour tested only then, right when at least COLOUR_FRACTION of its mask's pixels
  fall in the colour's HSV range (an empty mask is wrong);
- success: both right;
- its mIoU term, the evaluator's quirk kept as is: the best IoU when both are right,
  0 when the colour is wrong, the (below-threshold) best IoU itself when the position
  is wrong, 0 when nothing was detected.

Levels are instance counts (L2..L6); rates are weighted by instances. An item that
was not evaluated (failed render, missing image) counts its instances as failures
with mIoU 0: nothing drops out of a denominator.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from threedis.engine.eval.protocol import COLOUR_FRACTION, POSITION_IOU


@dataclass(frozen=True)
class InstanceMeasure:
    """What the detector and the segmenter saw for one instance (cached as is)."""

    detections: int  # detections kept after thresholds and NMS
    best_iou: float  # best IoU of those with the instance's box (0.0 without any)
    colour_share: float | None = None  # share of mask pixels in the colour's range; None: not segmented
    mask_pixels: int = 0

    def to_list(self) -> list[Any]:
        return [self.detections, self.best_iou, self.colour_share, self.mask_pixels]

    @classmethod
    def from_list(cls, value: list[Any]) -> "InstanceMeasure":
        detections, best_iou, share, pixels = value
        return cls(int(detections), float(best_iou), None if share is None else float(share), int(pixels))


@dataclass(frozen=True)
class Verdict:
    position: bool
    colour: bool
    miou: float

    @property
    def success(self) -> bool:
        return self.position and self.colour


def judge(m: InstanceMeasure) -> Verdict:
    """The reference evaluator's rules for one instance (see the module docstring)."""
    if m.detections == 0:
        return Verdict(False, False, 0.0)
    if m.best_iou < POSITION_IOU:
        return Verdict(False, False, m.best_iou)
    colour = m.mask_pixels > 0 and m.colour_share is not None and m.colour_share >= COLOUR_FRACTION
    return Verdict(True, colour, m.best_iou if colour else 0.0)


@dataclass
class Tally:
    """Counts of one level (or all levels) of one set of images."""

    instances: int = 0  # instances the prompts ask for
    evaluated: int = 0  # of those, in an image that was scored
    successes: int = 0
    positions: int = 0
    miou_sum: float = 0.0
    images: int = 0
    images_evaluated: int = 0
    image_successes: int = 0

    @property
    def missing(self) -> int:
        return self.instances - self.evaluated

    def add_image(self, verdicts: list[Verdict] | None, level: int) -> None:
        """One image of `level` instances; None: not evaluated (its instances count as failures)."""
        self.instances += level
        self.images += 1
        if verdicts is None:
            return
        self.evaluated += level
        self.images_evaluated += 1
        self.successes += sum(v.success for v in verdicts)
        self.positions += sum(v.position for v in verdicts)
        self.miou_sum += sum(v.miou for v in verdicts)
        self.image_successes += all(v.success for v in verdicts)

    def to_dict(self) -> dict[str, Any]:
        def rate(num: float, den: int) -> float | None:
            return num / den if den else None

        return {
            "instances": self.instances, "evaluated": self.evaluated, "missing": self.missing,
            "successes": self.successes, "instance_success": rate(self.successes, self.instances),
            "miou": rate(self.miou_sum, self.instances), "images": self.images,
            "image_successes": self.image_successes, "image_success": rate(self.image_successes, self.images),
            # over the evaluated images only: what the reference evaluator prints for the files that exist
            "instance_success_evaluated": rate(self.successes, self.evaluated),
            "miou_evaluated": rate(self.miou_sum, self.evaluated),
            "position_success": rate(self.positions, self.instances),
        }


@dataclass
class Scores:
    """Tallies per level and overall of one set of images (one seed, or all seeds pooled)."""

    levels: dict[int, Tally] = field(default_factory=dict)
    overall: Tally = field(default_factory=Tally)

    def add_image(self, level: int, verdicts: list[Verdict] | None) -> None:
        self.levels.setdefault(level, Tally()).add_image(verdicts, level)
        self.overall.add_image(verdicts, level)

    def to_dict(self) -> dict[str, Any]:
        out = {f"L{level}": tally.to_dict() for level, tally in sorted(self.levels.items())}
        out["overall"] = self.overall.to_dict()
        return out


RATES = ("instance_success", "miou", "image_success")


def spread(per_seed: Mapping[str, Scores]) -> dict[str, Any]:
    """Mean, sample standard deviation, min and max over seeds of each rate, per level and overall."""
    tables = [scores.to_dict() for scores in per_seed.values()]
    keys = sorted({k for t in tables for k in t}, key=lambda k: (k == "overall", k))
    out: dict[str, Any] = {}
    for key in keys:
        out[key] = {}
        for rate in RATES:
            values = [t[key][rate] for t in tables if key in t and t[key][rate] is not None]
            out[key][rate] = _stats(values)
    return out


def _stats(values: Iterable[float]) -> dict[str, Any]:
    values = list(values)
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None, "seeds": 0}
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": math.fsum(values) / len(values), "std": std, "min": min(values), "max": max(values),
            "seeds": len(values)}
