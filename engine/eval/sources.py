"""What to score: every image a COCO-MIG run should have, found through a batch manifest or in a plain folder.

A `threedis batch` run is read through its manifest (engine/batch/manifest.py): the
jobs it was made from give the ground truth and the full list of (prompt, seed)
items, the latest row of each item says whether it was rendered, and only paths
inside the run folder are followed. An item that failed, never ran, or whose image
is gone is kept, as not evaluated, so it stays in every denominator.

A plain folder holds images named like the MIGC generator's (`..._<coco_id>.png`,
the reference evaluator's only rule); `threedis batch export-mig` writes such
folders. Images of one prompt that share the name part before the coco id (MIGC
puts the seed there, export-mig `seed<s>`) form one seed; the ground truth's other
prompts count as missing in each seed.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from threedis import UserError
from threedis.engine.batch.mig import MIG_JOBS_NAME
from threedis.engine.eval.truth import (TruthEntry, entry_from_job_data, entry_from_layout, truth_from_reference_json,
                                        truth_from_yaml)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
ANNOTATED_PREFIX = "anno_"  # MIGC also saves a copy with the boxes drawn on it: never scored


@dataclass(frozen=True)
class EvalItem:
    """One image the benchmark expects. status: 'done' (image to score), 'failed' or 'missing'."""

    name: str  # "<job>/seed-<s>" or the file name
    group: str  # the seed it belongs to
    truth: TruthEntry
    image: Path | None
    status: str
    note: str = ""
    sha256: str | None = None  # as recorded in the manifest (None in a plain folder)


@dataclass
class Source:
    """Items to score and what was noticed while listing them (skipped files, jobs without a coco id)."""

    kind: str  # "run" or "folder"
    path: Path
    items: list[EvalItem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    truth_from: str = ""


def _natural(text: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


# ---------------------------------------------------------------- a batch run


def _run_info(rows: dict[tuple[str, Any], dict[str, Any]]) -> dict[str, Any]:
    """The `run` record of the most recent manifest row (jobs file, default seeds), or {}."""
    latest = max(rows.values(), key=lambda r: str(r.get("finished_at", "")), default={})
    info = latest.get("run")
    return info if isinstance(info, dict) else {}


def _default_seeds(rows: dict[tuple[str, Any], dict[str, Any]]) -> tuple[int, ...]:
    """Every seed the run's commands gave with --seeds (seeds added by a later command are items too)."""
    from threedis.engine.batch.seeds import parse_seeds

    seeds: dict[int, None] = {}
    for row in rows.values():
        info = row.get("run") if isinstance(row.get("run"), dict) else {}
        try:
            seeds.update(dict.fromkeys(parse_seeds(info.get("seeds", 0), "the manifest's seeds")))
        except UserError:
            continue
    return tuple(sorted(seeds)) or (0,)


def _jobs_file(run_dir: Path, info: dict[str, Any], jobs: Path | None) -> Path:
    if jobs is not None:
        return jobs
    recorded = info.get("jobs_file")
    candidates = []
    if isinstance(recorded, str) and recorded:
        candidates.append(run_dir / recorded if not Path(recorded).is_absolute() else Path(recorded))
    candidates.append(run_dir / MIG_JOBS_NAME)
    for path in candidates:
        if path.is_file():
            return path
    raise UserError(f"cannot find the job file of the run in {run_dir} (the manifest names "
                    f"{recorded or 'none'}); pass --jobs JOBS.jsonl or --from-mig FILE.yaml")


def run_source(run_dir: str | Path, jobs: Path | None = None, from_mig: Path | None = None) -> Source:
    """Every (COCO-MIG job, seed) of a batch run, with its image when the manifest says it was rendered.

    A job line the batch could not render (recorded once as failed) still asks for its prompt's
    instances in every seed: its items are failed, read from the line as written.
    """
    from threedis.engine.batch.jobs import JobDefaults, jobs_from_lines, load_jobs
    from threedis.engine.batch.manifest import MANIFEST_NAME, latest_rows, read_rows, resolve_inside
    from threedis.engine.batch.mig import mig_jobs

    run_dir = Path(run_dir)
    manifest = run_dir / MANIFEST_NAME
    if not manifest.is_file():
        raise UserError(f"{run_dir} holds no {MANIFEST_NAME}: give a `threedis batch` output folder, or a folder "
                        f"of images named ..._<coco_id>.png with --from-mig FILE.yaml")
    rows = latest_rows(read_rows(manifest))
    info = _run_info(rows)
    defaults = JobDefaults(seeds=_default_seeds(rows))
    source = Source(kind="run", path=run_dir)
    if from_mig is not None:
        written = mig_jobs(from_mig)  # read as `batch --from-mig` reads them: the same ids, duplicates too
        parsed = jobs_from_lines([json.dumps(data) for data in written], from_mig, defaults).jobs
        source.truth_from = str(from_mig)

        def as_written(job: Any) -> Any:
            return written[job.line - 1]
    else:
        path = _jobs_file(run_dir, info, jobs)
        parsed = load_jobs(path, defaults).jobs
        source.truth_from = str(path)
        as_written = _line_reader(path)
    for job in parsed:
        if job.problem is not None or job.layout is None:
            truth = _truth_of_a_bad_line(job, as_written(job), source)
            for seed in job.seeds if truth is not None else ():
                source.items.append(EvalItem(name=f"{job.id}/seed-{seed}", group=str(seed), truth=truth, image=None,
                                             status="failed", note=f"line {job.line}: {job.problem}"))
            continue
        coco_id = job.meta.get("coco_id") if isinstance(job.meta, dict) else None
        if coco_id is None:
            source.notes.append(f"job {job.id} (line {job.line}) is not a COCO-MIG job (no meta.coco_id): skipped")
            continue
        truth = entry_from_layout(str(coco_id), job.layout, f"job {job.id}")
        rendered = [seed for (name, seed) in rows if name == job.id and isinstance(seed, int)]
        for seed in dict.fromkeys([*job.seeds, *sorted(rendered)]):
            source.items.append(_run_item(run_dir, job.id, seed, truth, rows.get((job.id, seed)), resolve_inside))
    return source


def _line_reader(path: Path) -> Any:
    """job -> its line of `path` as JSON (None when it cannot be read), held to the batch's per-line limits."""
    from threedis.engine.batch.jobs import read_line

    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()

    def read(job: Any) -> Any:
        text = lines[job.line - 1] if 0 < job.line <= len(lines) else ""
        return read_line(text)[0]

    return read


def _truth_of_a_bad_line(job: Any, data: Any, source: Source) -> TruthEntry | None:
    """The prompt a bad COCO-MIG line asks for (its items count as failed), or None with a note saying why not."""
    meta = data.get("meta") if isinstance(data, dict) else None
    coco_id = meta.get("coco_id") if isinstance(meta, dict) else None
    if coco_id is None:
        source.notes.append(f"job {job.id} (line {job.line}) cannot be read and names no meta.coco_id "
                            f"({job.problem}): not counted")
        return None
    try:
        return entry_from_job_data(str(coco_id), data.get("layout"), f"job {job.id} (line {job.line})")
    except UserError as err:
        source.notes.append(f"job {job.id} (line {job.line}) names coco_id {coco_id} but its instances cannot be "
                            f"read ({err}): not counted")
        return None


def _run_item(run_dir: Path, job: str, seed: int, truth: TruthEntry, row: dict[str, Any] | None,
              resolve_inside: Any) -> EvalItem:
    name = f"{job}/seed-{seed}"

    def item(status: str, image: Path | None = None, note: str = "", sha: str | None = None) -> EvalItem:
        return EvalItem(name=name, group=str(seed), truth=truth, image=image, status=status, note=note, sha256=sha)

    if row is None:
        return item("missing", note="not rendered yet")
    if row.get("status") != "done":
        return item("failed", note=str(row.get("error") or "failed"))
    image = resolve_inside(run_dir, (row.get("files") or {}).get("image"))
    if image is None:
        return item("missing", note="the manifest's image path is not inside the run folder")
    if not image.is_file():
        return item("missing", note=f"image {image.name} is not on disk")
    return item("done", image=image, sha=row.get("sha256") if isinstance(row.get("sha256"), str) else None)


# ---------------------------------------------------------------- a plain folder


def load_truth(from_mig: Path | None, truth_json: Path | None) -> tuple[dict[str, TruthEntry], str]:
    if from_mig is not None and truth_json is not None:
        raise UserError("give either --from-mig FILE.yaml or --truth FILE.json, not both")
    if from_mig is not None:
        return truth_from_yaml(from_mig), str(from_mig)
    if truth_json is not None:
        return truth_from_reference_json(truth_json), str(truth_json)
    raise UserError("a folder of images needs its ground truth: --from-mig mig_bench_anno.yaml (MIGC's "
                    "bench_file/) or --truth sample_prompt_color_split.json (the reference evaluator's)")


def folder_source(folder: str | Path, truth: dict[str, TruthEntry], truth_from: str = "") -> Source:
    """Every image `..._<coco_id>.(png|jpg)` in `folder` (not MIGC's anno_ copies), grouped into seeds."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder")
    source = Source(kind="folder", path=folder, truth_from=truth_from)
    files = sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                    and not p.name.startswith((".", ANNOTATED_PREFIX))), key=lambda p: _natural(p.name))
    found: list[tuple[Path, str, str]] = []  # (file, coco id, tag)
    unknown = []
    for path in files:
        parts = path.stem.split("_")
        coco_id, tag = parts[-1], parts[-2] if len(parts) > 1 else ""
        if coco_id not in truth:
            unknown.append(path.name)
            continue
        found.append((path, coco_id, tag))
    if unknown:
        source.notes.append(f"{len(unknown)} image(s) whose name does not end in a known _<coco_id>: skipped "
                            f"(e.g. {unknown[0]})")
    skipped = sum(1 for p in folder.iterdir() if p.name.startswith(ANNOTATED_PREFIX))
    if skipped:
        source.notes.append(f"{skipped} annotated copies (anno_*) skipped")
    per_prompt: dict[str, int] = defaultdict(int)
    for _, coco_id, _ in found:
        per_prompt[coco_id] += 1
    tags = {tag for _, _, tag in found}
    by_tag = bool(found) and len(tags) <= max(per_prompt.values())  # tags shared across prompts: a seed axis
    groups: dict[str, list[tuple[Path, str]]] = defaultdict(list)
    for path, coco_id, tag in found:
        groups[tag if by_tag else "all"].append((path, coco_id))
    if not groups:
        groups["all"] = []
    for group in sorted(groups, key=_natural):
        present = set()
        for path, coco_id in groups[group]:
            present.add(coco_id)
            source.items.append(EvalItem(name=path.name, group=group, truth=truth[coco_id], image=path, status="done"))
        for coco_id in sorted(set(truth) - present, key=_natural):
            source.items.append(EvalItem(name=f"{coco_id} ({group})", group=group, truth=truth[coco_id], image=None,
                                         status="missing", note="no image"))
    return source
