"""COCO-MIG importer: the MIGC benchmark's annotation YAML -> batch jobs.

The file (bench_file/mig_bench_anno.yaml in the MIGC repository) maps each
prompt to its instance phrases; each phrase holds a list of [x0, y0, x1, y1]
boxes in normalised coordinates (one instance per box), and `coco_id` names
the COCO image the layout came from. The user brings the file: its licence is
non-commercial, so the project ships only a small hand-written one for tests.
Read with yaml.safe_load only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from threedis import UserError
from threedis.engine.outputs import replace_file
from threedis.engine.paths import input_file, make_folder

MIG_JOBS_NAME = "jobs-mig.jsonl"  # where `batch --from-mig --out DIR` keeps the jobs, in DIR


def _boxes(prompt: str, phrase: Any, boxes: Any) -> list[dict[str, Any]]:
    where = f"prompt {prompt!r}, phrase {phrase!r}"
    if not isinstance(phrase, str) or not phrase.strip():
        raise UserError(f"{where}: an instance phrase must be text")
    if not isinstance(boxes, list) or not boxes:
        raise UserError(f"{where}: expected a list of [x0, y0, x1, y1] boxes")
    out = []
    for box in boxes:
        if not isinstance(box, list) or len(box) != 4 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
            raise UserError(f"{where}: a box must be four numbers [x0, y0, x1, y1], got {box!r}")
        out.append({"prompt": phrase, "box": [float(v) for v in box]})
    return out


def mig_jobs(path: str | Path, size: int = 512) -> list[dict[str, Any]]:
    """One job object (as in the JSONL) per prompt, in file order; stage 1 makes each depth map.

    Job ids are mig-<index>-<coco_id> (index in file order, 4 digits), so the
    output folders sort like the file and name their COCO image.
    """
    import yaml

    path = input_file(path, "COCO-MIG file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}: not valid YAML{at}") from None
    if not isinstance(data, dict) or not data:
        raise UserError(f"{path}: expected a mapping of prompts to their instance phrases (mig_bench_anno.yaml)")
    jobs = []
    for index, (prompt, entry) in enumerate(data.items()):
        if not isinstance(prompt, str) or not isinstance(entry, dict):
            raise UserError(f"{path}: entry {index + 1}: expected 'prompt: {{phrase: [boxes], coco_id: ...}}'")
        coco_id = str(entry.get("coco_id", "")).strip()
        instances = [inst for phrase, boxes in entry.items() if phrase != "coco_id"
                     for inst in _boxes(prompt, phrase, boxes)]
        safe_coco = "".join(c for c in coco_id if c.isalnum()) or "x"
        jobs.append({
            "id": f"mig-{index:04d}-{safe_coco}",
            "layout": {"prompt": prompt, "width": size, "height": size, "instances": instances},
            "meta": {"source": "coco-mig", "coco_id": coco_id, "index": index},
        })
    return jobs


def write_jobs_jsonl(jobs: list[dict[str, Any]], path: str | Path, overwrite: bool = False) -> Path:
    """Write job objects as JSONL (one a line); an existing file is a UserError unless overwrite."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists; choose another --write-jsonl name")
    make_folder(path.parent, "folder", "choose another --write-jsonl name")
    return replace_file(path, "".join(json.dumps(job) + "\n" for job in jobs).encode("utf-8"))
