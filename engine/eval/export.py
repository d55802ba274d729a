"""`threedis batch export-mig RUN_DIR DEST`: a run as the reference evaluator reads it.

eval_mig.py scores every file of its --image_dir, taking the coco id from the
name's last '_' part, and reads its ground truth from sample_prompt_color_split.json
in the folder it runs in. So DEST gets images/ (links to the run's images, named
<job>_seed<s>_<coco_id>.png: nothing else may be in that folder) and the truth JSON
beside it, rebuilt from the jobs the run was made from (the user's YAML).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from threedis import UserError
from threedis.engine.eval.protocol import REFERENCE_TRUTH_NAME
from threedis.engine.eval.sources import run_source
from threedis.engine.eval.truth import reference_json
from threedis.engine.paths import make_folder

IMAGES = "images"


@dataclass
class Exported:
    images: Path
    truth: Path
    linked: int
    not_rendered: int


def _link(target: Path, link: Path) -> None:
    """A symbolic link (absolute target); else a hard link; else a copy (file systems without links)."""
    try:
        os.symlink(target, link)
        return
    except OSError:
        pass
    try:
        os.link(target, link)
    except OSError:
        shutil.copyfile(target, link)


def export_mig(run_dir: str | Path, dest: str | Path, from_mig: Path | None = None) -> Exported:
    """Link every rendered image of a COCO-MIG run into DEST/images and write DEST/sample_prompt_color_split.json."""
    from threedis.engine.outputs import replace_file

    run_dir, dest = Path(run_dir), Path(dest)
    source = run_source(run_dir, from_mig=from_mig)
    if not source.items:
        raise UserError(f"{run_dir}: no COCO-MIG jobs in the run (jobs need meta.coco_id, as --from-mig writes)")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UserError(f"{dest} exists and is not an empty folder; the reference evaluator scores every file in its "
                        f"image folder, so give a new one")
    for item in source.items:
        coco_id = item.truth.coco_id
        if not coco_id or any(c in coco_id for c in "_/\\.\0") or not coco_id.isprintable():
            raise UserError(f"coco_id {coco_id!r} cannot end a file name the reference evaluator splits on '_' and "
                            f"'.'; fix the annotation file")
    truth = reference_json(item.truth for item in source.items)
    images = dest / IMAGES
    make_folder(images, "image folder", "choose another DEST")
    linked = 0
    for item in source.items:
        coco_id = item.truth.coco_id
        if item.status != "done":
            continue
        job = item.name.split("/")[0]
        try:
            _link(item.image.resolve(), images / f"{job}_seed{item.group}_{coco_id}{item.image.suffix}")
        except OSError as exc:
            raise UserError(f"cannot write into {images}: {exc.strerror or exc}") from None
        linked += 1
    truth_path = replace_file(dest / REFERENCE_TRUTH_NAME, (json.dumps(truth, indent=1) + "\n").encode())
    return Exported(images=images, truth=truth_path, linked=linked, not_rendered=len(source.items) - linked)
