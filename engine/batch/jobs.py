"""The batch job file: JSONL, one job a line, each expanded into (job, seed) items.

A line holds a layout (inline, or a path relative to the JSONL's folder),
optional seeds, the depth source (a depth-map path, a photo path, or neither
for stage 1) and render settings. A bad line does not stop the batch: it
becomes a job with a `problem`, recorded as failed once (one item, whatever its
seeds), and `threedis validate` lists every such line by number. Each line is
held to a layout's limits before it is parsed: its size in bytes, and how deep
its JSON nests.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

from threedis import Layout, RenderOptions, Stage1Options, UserError
from threedis.engine.batch.seeds import parse_seeds
from threedis.engine.layout import DEFAULT_LAYOUT_LIMITS, LayoutError, check_nesting, loads_strict
from threedis.engine.stages import TINY_STAGE1
from threedis.engine.tiny_rules import STEPS
from threedis.engine.paths import input_file

JOB_KEYS = ("id", "layout", "seeds", "depth", "depth_from_photo", "steps", "guidance", "sam", "schedule",
            "stage1", "options", "meta")
SCHEDULE_KEYS = ("hard", "i2i", "i2t", "t2i", "t2t")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_LINE_BYTES = DEFAULT_LAYOUT_LIMITS.max_file_bytes  # a line holds at most one layout and a few settings
MAX_LINE_NESTING = 10  # job > layout > instances > instance > box is 5; meta may nest a little more


@dataclass(frozen=True)
class JobDefaults:
    """What a job gets for the settings it leaves out (the tiny checkpoints want smaller ones).

    size: (width, height) every layout is rendered at instead of its own (boxes are
    normalised, so the layout keeps its meaning); None keeps each layout's size.
    """

    seeds: tuple[int, ...] = (0,)
    steps: int = 20
    guidance: float = 10.0
    stage1: Stage1Options = field(default_factory=Stage1Options)
    size: tuple[int, int] | None = None


TINY_DEFAULTS = JobDefaults(steps=STEPS, stage1=TINY_STAGE1)  # tiny_rules: seconds per item on a CPU


@dataclass(frozen=True)
class Job:
    """One parsed line. `problem` set: the line cannot be rendered and its items are recorded as failed."""

    id: str
    line: int
    seeds: tuple[int, ...]
    layout: Layout | None = None
    depth: str | None = None
    depth_from_photo: str | None = None
    steps: int = 20
    guidance: float = 10.0
    sam: bool = False
    schedule: Any = None  # threedis.kernels.rule.Schedule or None (the engine's default)
    stage1: Stage1Options | None = None  # None unless stage 1 makes the depth
    options: RenderOptions = field(default_factory=RenderOptions)
    meta: dict = field(default_factory=dict)
    problem: str | None = None
    key: str = ""  # sha256 of everything that shapes the image: a changed job is rendered again

    @property
    def needs(self) -> frozenset[str]:
        """The auxiliary models this job's render loads: stage1, photo (depth estimator), sam."""
        if self.problem is not None:
            return frozenset()
        used = {"stage1": self.stage1 is not None, "photo": self.depth_from_photo is not None, "sam": self.sam}
        return frozenset(name for name, on in used.items() if on)

    def render_kwargs(self, seed: int) -> dict[str, Any]:
        """Keyword arguments of Engine.render for one seed of this job."""
        return dict(layout=self.layout, depth=self.depth, depth_from_photo=self.depth_from_photo, seed=seed,
                    steps=self.steps, guidance=self.guidance, schedule=self.schedule, sam=self.sam,
                    stage1=self.stage1, options=self.options)


@dataclass(frozen=True)
class Item:
    """One image to make: a job and one of its seeds (None: the one failed record of a bad line)."""

    job: Job
    seed: int | None

    @property
    def name(self) -> str:
        return f"{self.job.id}/seed-{self.seed}" if self.seed is not None else f"{self.job.id}/line-{self.job.line}"


@dataclass
class JobFile:
    path: Path
    jobs: list[Job]

    @property
    def problems(self) -> list[Job]:
        return [job for job in self.jobs if job.problem is not None]

    def items(self) -> Iterator[Item]:
        """Every (job, seed); a bad line is one item, not one per seed it asked for."""
        for job in self.jobs:
            if job.problem is not None:
                yield Item(job, None)
                continue
            for seed in job.seeds:
                yield Item(job, seed)


# ---------------------------------------------------------------- one field at a time


def _file(value: Any, folder: Path, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise UserError(f"{name} must be a file path (text), got {value!r}")
    path = input_file((folder / value).expanduser(), name)
    return str(path.resolve())


def _layout(value: Any, folder: Path) -> Layout:
    if isinstance(value, str):
        path = (folder / value).expanduser()
        return Layout.load(path)
    if isinstance(value, dict):
        return Layout.from_dict(value, base_dir=folder.resolve())
    raise UserError(f"layout must be an object or a path to a layout file, got {type(value).__name__}")


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name} must be a whole number >= 1, got {value!r}")
    return value


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{name} must be a number, got {value!r}")
    return float(value)


def _object(value: Any, name: str, allowed: tuple[str, ...]) -> dict:
    if not isinstance(value, dict):
        raise UserError(f"{name} must be an object {{...}}, got {type(value).__name__}")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise UserError(f"{name}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    return value


def _schedule(value: Any, steps: int) -> Any:
    from threedis.kernels.rule import RuleError, Schedule

    given = _object(value, "schedule", SCHEDULE_KEYS)
    base = dict(hard=steps, i2i=min(4, steps), i2t=steps, t2i=steps, t2t=steps)  # the engine's default schedule
    try:
        return Schedule(steps=steps, **{**base, **given})
    except RuleError as err:
        raise UserError(str(err)) from None


def _stage1(value: Any, default: Stage1Options) -> Stage1Options:
    given = _object(value, "stage1", tuple(Stage1Options.__dataclass_fields__))
    try:
        return replace(default, **given)
    except TypeError as err:
        raise UserError(f"stage1: {err}") from None


def _options(value: Any) -> RenderOptions:
    given = _object(value, "options", tuple(RenderOptions.__dataclass_fields__))
    return RenderOptions(**given)


def _job_key(job: Job) -> str:
    """sha256 of the resolved job: layout, depth source and settings (not the id, seeds or meta)."""
    data = {
        "layout": job.layout.to_dict() if job.layout is not None else None, "depth": job.depth,
        "depth_from_photo": job.depth_from_photo, "steps": job.steps, "guidance": job.guidance, "sam": job.sam,
        "schedule": asdict(job.schedule) if job.schedule is not None else None,
        "stage1": job.stage1.to_dict() if job.stage1 is not None else None, "options": asdict(job.options),
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------- a line, a file


def parse_job(data: Any, line: int, folder: Path, defaults: JobDefaults) -> Job:
    """One parsed JSON value -> Job; every problem of the line is gathered into job.problem."""
    default_id = f"job-{line:05d}"
    if not isinstance(data, dict):
        return Job(id=default_id, line=line, seeds=defaults.seeds,
                   problem=f"a job must be a JSON object {{...}}, got {type(data).__name__}")
    problems: list[str] = []
    values: dict[str, Any] = {}

    def check(name: str, fn, *args: Any) -> Any:
        try:
            return fn(*args)
        except UserError as err:
            subproblems = getattr(err, "problems", None) or [err]
            problems.extend(str(p) if name in str(p) else f"{name}: {p}" for p in subproblems)
            return None

    unknown = sorted(set(data) - set(JOB_KEYS))
    if unknown:
        problems.append(f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(JOB_KEYS)}")
    job_id = data.get("id", default_id)
    if not isinstance(job_id, str) or not _ID.match(job_id):
        problems.append(f"id must be 1-128 letters, digits, '.', '_' or '-' (a folder name), got {job_id!r}")
        job_id = default_id
    seeds = defaults.seeds
    if "seeds" in data:
        seeds = check("seeds", parse_seeds, data["seeds"]) or defaults.seeds
    if "layout" not in data:
        problems.append("layout: missing (an object, or a path to a layout file)")
    else:
        values["layout"] = check("layout", _layout, data["layout"], folder)
        if values["layout"] is not None and defaults.size is not None:
            width, height = defaults.size
            values["layout"] = check("layout", lambda lay: replace(lay, width=width, height=height), values["layout"])
    if "depth" in data and "depth_from_photo" in data:
        problems.append("give either depth or depth_from_photo, not both (neither: stage 1 makes the depth)")
    for name in ("depth", "depth_from_photo"):
        if name in data:
            values[name] = check(name, _file, data[name], folder, name)
    steps = defaults.steps
    if "steps" in data:
        steps = check("steps", _positive_int, data["steps"], "steps") or defaults.steps
    values["steps"] = steps
    values["guidance"] = defaults.guidance
    if "guidance" in data:
        values["guidance"] = check("guidance", _number, data["guidance"], "guidance")
    if "sam" in data:
        if not isinstance(data["sam"], bool):
            problems.append(f"sam must be true or false, got {data['sam']!r}")
        else:
            values["sam"] = data["sam"]
    if "schedule" in data:
        values["schedule"] = check("schedule", _schedule, data["schedule"], steps)
    if "depth" not in data and "depth_from_photo" not in data:
        values["stage1"] = defaults.stage1
        if "stage1" in data:
            values["stage1"] = check("stage1", _stage1, data["stage1"], defaults.stage1)
    elif "stage1" in data:
        problems.append("stage1 settings given but the job has its own depth source; drop one")
    if "options" in data:
        values["options"] = check("options", _options, data["options"])
    if "meta" in data:
        if not isinstance(data["meta"], dict):
            problems.append("meta must be an object {...} (kept in the manifest, not used for rendering)")
        else:
            values["meta"] = data["meta"]
    if problems:
        return Job(id=job_id, line=line, seeds=seeds, problem="; ".join(problems))
    job = Job(id=job_id, line=line, seeds=seeds, **values)
    return replace(job, key=_job_key(job))


def read_line(text: str) -> tuple[Any, str | None]:
    """(parsed value, None) or (None, the problem): a line over the size or nesting limit is not parsed further."""
    size = len(text.encode("utf-8", errors="replace"))
    if size > MAX_LINE_BYTES:
        return None, f"the line is {size} bytes, more than the limit of {MAX_LINE_BYTES} for one job"
    too_deep = f"the JSON nests more than {MAX_LINE_NESTING} levels deep; a job is not nested like that"
    try:
        data = loads_strict(text)
    except json.JSONDecodeError as exc:
        return None, f"invalid JSON at column {exc.colno}: {exc.msg}"
    except RecursionError:
        return None, too_deep
    except LayoutError as err:  # NaN, a key given twice, a 5000-digit number
        return None, str(err)
    try:
        check_nesting(data, MAX_LINE_NESTING)
    except LayoutError:
        return None, too_deep
    return data, None


def load_jobs(path: str | Path, defaults: JobDefaults = JobDefaults()) -> JobFile:
    """Read a JSONL job file; blank lines are skipped, ids must be unique.

    Raises UserError only when the file itself cannot be read; bad lines come back as
    jobs with a problem.
    """
    path = input_file(path, "job file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read job file {path}: {exc}") from None
    return jobs_from_lines(lines, path, defaults)


def jobs_from_lines(lines: Sequence[str], path: Path, defaults: JobDefaults = JobDefaults()) -> JobFile:
    """The jobs of JSONL `lines` read from, or about to be written to, `path` (relative paths: its folder).

    Why apart from load_jobs: `batch --from-mig` parses its jobs before it may write them into
    an output folder another command could be writing (the file is written under the lock).
    """
    folder = path.parent
    jobs: list[Job] = []
    first_line: dict[str, int] = {}
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        data, problem = read_line(text)
        if problem is not None:
            job = Job(id=f"job-{number:05d}", line=number, seeds=defaults.seeds, problem=problem)
        else:
            job = parse_job(data, number, folder, defaults)
        if job.id in first_line:
            job = replace(job, id=f"job-{number:05d}", key="",
                          problem=f"id {job.id!r} already used on line {first_line[job.id]}")
        first_line.setdefault(job.id, number)
        jobs.append(job)
    if not jobs:
        raise UserError(f"{path} holds no jobs (one JSON object a line)")
    return JobFile(path=path, jobs=jobs)


def validate_jobs_file(path: Path) -> bool:
    """`threedis validate jobs.jsonl`: print each bad line by number; True when every line is fine."""
    jobs = load_jobs(path)
    bad = jobs.problems
    for job in bad:
        print(f"{path}: line {job.line}: INVALID: {job.problem}")
    items = sum(len(job.seeds) for job in jobs.jobs)
    if not bad:
        print(f"{path}: ok ({len(jobs.jobs)} jobs, {items} items with the default seeds)")
    else:
        print(f"{path}: {len(bad)} of {len(jobs.jobs)} jobs invalid")
    return not bad
