"""Ground truth of a COCO-MIG prompt: each instance's colour, class name and box.

It comes from the user's annotation YAML (through the batch importer, so a run's
jobs and the truth agree), from a run's job file (the jobs carry the layouts and
the coco id), or from the reference evaluator's own JSON
(`{coco_id: {caption, segment: [{label, bbox}]}}`, label "<colour> <class>"), which
`reference_json` writes back for `threedis batch export-mig`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from threedis import UserError
from threedis.engine.eval.protocol import COLOURS

_ARTICLES = ("a", "an", "the")


@dataclass(frozen=True)
class TruthInstance:
    """One instance to find: the detector is asked for `noun`, the segment tested for `colour`."""

    colour: str
    noun: str
    box: tuple[float, float, float, float]  # normalised (x0, y0, x1, y1)

    @property
    def label(self) -> str:
        """The reference JSON's label: the colour word, then the class name."""
        return f"{self.colour} {self.noun}"


@dataclass(frozen=True)
class TruthEntry:
    """One prompt of the benchmark: its coco id, caption and instances in file order."""

    coco_id: str
    caption: str
    instances: tuple[TruthInstance, ...]

    @property
    def level(self) -> int:
        """The benchmark's level: how many instances the prompt asks for."""
        return len(self.instances)

    @property
    def key(self) -> str:
        """sha256 of what the scores depend on (labels and boxes): part of a cached result's key."""
        data = [[i.colour, i.noun, list(i.box)] for i in self.instances]
        return hashlib.sha256(json.dumps(data).encode()).hexdigest()[:16]


def split_phrase(phrase: str, where: str = "") -> tuple[str, str]:
    """'a red dog' or 'red dog' -> ('red', 'dog'): an article dropped, the first word the colour, the rest the class.

    The reference evaluator takes the first word of its label as the colour and the
    rest as the detector's query; its labels carry no article.
    """
    words = str(phrase).split()
    if words and words[0].lower() in _ARTICLES:
        words = words[1:]
    at = f"{where}: " if where else ""
    if len(words) < 2:
        raise UserError(f"{at}instance {phrase!r} is not '<colour> <class>' (e.g. 'a red dog')")
    colour = words[0].lower()
    if colour not in COLOURS:
        raise UserError(f"{at}instance {phrase!r}: {colour!r} is not one of the benchmark's colours "
                        f"({', '.join(COLOURS)})")
    return colour, " ".join(words[1:])


def _box(value: Any, where: str) -> tuple[float, float, float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 4 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise UserError(f"{where}: a box must be four numbers [x0, y0, x1, y1], got {value!r}")
    return tuple(float(v) for v in value)  # type: ignore[return-value]


def entry_from_layout(coco_id: str, layout: Any, where: str) -> TruthEntry:
    """Truth from a batch job's layout (a threedis Layout): instance prompts 'a <colour> <class>'."""
    instances = tuple(TruthInstance(*split_phrase(inst.prompt, where), tuple(float(v) for v in inst.box))
                      for inst in layout.instances)
    return TruthEntry(coco_id=str(coco_id), caption=layout.prompt, instances=instances)


def entry_from_job_data(coco_id: str, layout: Any, where: str) -> TruthEntry:
    """Truth from a job line's layout object as written (not a threedis Layout): for a line the batch could
    not render (a box the engine refuses, a size it does not take), whose prompt still counts."""
    if not isinstance(layout, dict) or not isinstance(layout.get("instances"), list):
        raise UserError(f"{where}: no layout object with instances")
    instances = _instances(layout["instances"], "prompt", "box", where)
    return TruthEntry(coco_id=str(coco_id), caption=str(layout.get("prompt", "")), instances=instances)


def _instances(items: list, text: str, box: str, where: str) -> tuple[TruthInstance, ...]:
    """Instances from [{text: "a red dog", box: [x0, y0, x1, y1]}, ...] as written (job lines, the reference JSON)."""
    out = []
    for item in items:
        if not isinstance(item, dict) or text not in item or box not in item:
            raise UserError(f"{where}: each instance needs a {text} and a {box}")
        out.append(TruthInstance(*split_phrase(item[text], where), _box(item[box], where)))
    return tuple(out)


def truth_from_yaml(path: str | Path) -> dict[str, TruthEntry]:
    """coco id -> entry, from MIGC's mig_bench_anno.yaml (read by the batch importer).

    The phrases and boxes as the file has them: the truth need not be a layout the engine would
    render (another method's images are scored against it too).
    """
    from threedis.engine.batch.mig import mig_jobs

    out: dict[str, TruthEntry] = {}
    for job in mig_jobs(path):
        entry = entry_from_job_data(job["meta"]["coco_id"], job["layout"], f"{path}: {job['id']}")
        _add(out, entry, path)
    return out


def truth_from_reference_json(path: str | Path) -> dict[str, TruthEntry]:
    """coco id -> entry, from the reference evaluator's ground-truth JSON."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"ground-truth file not found: {path}") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise UserError(f"cannot read {path} as JSON: {str(exc)[:120]}") from None
    if not isinstance(data, dict) or not data:
        raise UserError(f"{path}: expected {{coco_id: {{caption, segment: [{{label, bbox}}]}}}}")
    out: dict[str, TruthEntry] = {}
    for coco_id, value in data.items():
        where = f"{path}: {coco_id}"
        if not isinstance(value, dict) or not isinstance(value.get("segment"), list):
            raise UserError(f"{where}: expected {{caption, segment: [{{label, bbox}}]}}")
        instances = _instances(value["segment"], "label", "bbox", where)
        _add(out, TruthEntry(str(coco_id), str(value.get("caption", "")), instances), path)
    return out


def _add(out: dict[str, TruthEntry], entry: TruthEntry, source: Any) -> None:
    if entry.coco_id in out and out[entry.coco_id] != entry:
        raise UserError(f"{source}: coco_id {entry.coco_id!r} names two different prompts; image names "
                        f"ending in _<coco_id>.png could not tell them apart")
    out[entry.coco_id] = entry


def reference_json(entries: Iterable[TruthEntry]) -> dict[str, Any]:
    """The reference evaluator's ground truth for `entries` (labels without the article, as it splits them)."""
    seen: dict[str, TruthEntry] = {}
    for entry in entries:
        _add(seen, entry, "the run's jobs")
    return {coco_id: {"caption": entry.caption,
                      "segment": [{"label": i.label, "bbox": list(i.box)} for i in entry.instances]}
            for coco_id, entry in seen.items()}
