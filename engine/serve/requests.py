"""Reading a job request: the layout (masks as upload ids) and the options, every problem at once.

A request is checked in full when it is submitted, so a bad one gets 422 with one
entry per problem (the layout's come from Layout.from_dict, the same messages as
`threedis validate`) and never reaches the queue. What is stored, and resubmitted,
is the normalised options and the layout as the client sent it; the Layout with
server-side mask paths is rebuilt from those when the job runs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from threedis.engine import tiny_rules
from threedis.engine.checks import MAX_STEPS, check_lora_scale, check_seed
from threedis.engine.errors import UserError
from threedis.engine.layout import EmptyPromptError, Layout, LayoutError, loads_strict
from threedis.engine.serve.uploads import UploadError, UploadStore

DEPTH_SOURCES = {"render": ("stage1", "upload", "photo", "job"), "depth": ("stage1", "photo")}
SCHEDULE_KEYS = ("hard", "i2i", "i2t", "t2i", "t2t")
I2I_DEFAULT = 4  # the authors' demos: image->image restriction for the first 4 steps


class RequestError(UserError):
    """A bad request: `problems` lists every (field, message); status is the HTTP code."""

    def __init__(self, message: str, problems: list[dict] | None = None, status: int = 422) -> None:
        super().__init__(message)
        self.problems = problems or []
        self.status = status


@dataclass
class _Problems:
    items: list[dict] = field(default_factory=list)

    def add(self, name: str, message: str) -> None:
        self.items.append({"field": name, "message": message})

    def summary(self, what: str) -> str:
        first = self.items[0]
        more = len(self.items) - 1
        tail = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
        return f"{what}: {first['field']}: {first['message']}{tail}"

    def raise_any(self, what: str) -> None:
        if self.items:
            raise RequestError(self.summary(what), self.items)


# Why a depth from the layout refuses an empty prompt while a photo's depth and a plan take one:
# stage 1 is text-to-depth; each box's shape comes from its prompt (CLIP), and an empty one gives
# every box the same text-free blob, which later renders on that depth would inherit.
STAGE1_NEEDS_PROMPTS = ("is empty; stage 1 makes the depth from the prompts (each box's shape from its own), so a "
                        "depth from the layout needs every prompt; a depth from a photo or an uploaded one needs none")


@dataclass(frozen=True)
class Defaults:
    """What an option is when the request leaves it out (the tiny checkpoints get tiny numbers)."""

    steps: int = 20
    stage1_steps: int = 30
    stage1_migc_steps: int = 16
    stage1_size: int = 512


TINY_DEFAULTS = Defaults(steps=tiny_rules.STEPS, stage1_steps=tiny_rules.STAGE1_STEPS,
                         stage1_migc_steps=tiny_rules.MIGC_STEPS, stage1_size=tiny_rules.STAGE1_SIZE)


def defaults_for(model: str | None, stage1: str | None) -> Defaults:
    """The tiny numbers where the model is a tiny checkpoint (tiny_rules): None is the built-in tiny one.

    The FLUX model decides the denoising steps, the stage-1 model stage 1's (without --model the
    service runs the tiny stage 1 unless --stage1 names another).
    """
    real = Defaults()
    flux_tiny = model is None or tiny_rules.is_tiny(model)
    stage1_tiny = (model is None and stage1 is None) or tiny_rules.is_tiny(stage1)
    pick = TINY_DEFAULTS if stage1_tiny else real
    return Defaults(steps=(TINY_DEFAULTS if flux_tiny else real).steps, stage1_steps=pick.stage1_steps,
                    stage1_migc_steps=pick.stage1_migc_steps, stage1_size=pick.stage1_size)


def parse_json(raw: bytes) -> Any:
    """A request body as JSON, read as strictly as a layout file (engine.layout.loads_strict);
    RequestError 422 for text that is not JSON, NaN/Infinity, a key given twice, a 5000-digit
    number or a nesting bomb."""
    try:
        return loads_strict(raw)
    except RecursionError:
        message = "the JSON is nested too deeply to read; a job is an object {layout, options} a few levels deep"
    except LayoutError as err:
        message = str(err)
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        message = f"the body is not valid JSON: {str(err).splitlines()[0][:200]}"
    raise RequestError(message, [{"field": "", "message": message}])


def _whole(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _number(value: Any, low: float, high: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high


def resolve_layout(data: Any, uploads: UploadStore, allow_empty_prompts: bool = False,
                   empty_prompt_message: str | None = None) -> Layout | None:
    """The client's layout JSON -> Layout, with {"mask": {"mask_upload": id}} turned into stored files.

    A mask given as a path is refused: no client-supplied path reaches the file system.
    """
    problems: list[dict] = []
    if isinstance(data, dict) and isinstance(data.get("instances"), list):
        instances = []
        for i, item in enumerate(data["instances"]):
            if isinstance(item, dict) and "mask" in item and item["mask"] is not None:
                item = dict(item)
                mask, name = item["mask"], f"instances[{i}].mask"
                if isinstance(mask, dict) and set(mask) == {"mask_upload"}:
                    try:
                        item["mask"] = str(uploads.get(mask["mask_upload"], ("mask", "depth"), name).path)
                    except UploadError as err:
                        problems.append({"field": name, "message": str(err).removeprefix(f"{name}: ")})
                        item.pop("mask")
                else:
                    problems.append({"field": name, "message": 'give {"mask_upload": <id>} of an image POSTed to '
                                     '/api/v1/uploads with kind=mask; the service reads no paths'})
                    item.pop("mask")
            instances.append(item)
        data = {**data, "instances": instances}
    try:
        layout = Layout.from_dict(data)
    except LayoutError as err:
        for problem in err.problems:
            if isinstance(problem, EmptyPromptError) and allow_empty_prompts:
                continue
            text = str(problem)
            where = problem.field
            if isinstance(problem, EmptyPromptError) and empty_prompt_message:
                text = empty_prompt_message
            problems.append({"field": where, "message": text.removeprefix(f"{where}: ") if where else text})
        layout = None
    if problems:
        _Problems(problems).raise_any("invalid layout")
    return layout


def layout_shape(data: Any, uploads: UploadStore) -> tuple[int, int, int]:
    """(width, height, number of instances) of a layout whose prompts may still be empty.

    What a photo's depth map and a memory plan need: neither reads a prompt, so an editor
    can ask for them before the prompts are written. Every other problem is refused.
    """
    layout = resolve_layout(data, uploads, allow_empty_prompts=True)
    if layout is None:  # its only problems are empty prompts: every other field was checked
        return data["width"], data["height"], len(data.get("instances") or [])
    return layout.width, layout.height, len(layout.instances)


def _check_schedule(value: Any, steps: int, problems: _Problems) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        problems.add("options.schedule", "must be null or an object {hard, i2i, i2t, t2i, t2t}")
        return None
    out = {}
    for key in value:
        if key not in SCHEDULE_KEYS:
            problems.add(f"options.schedule.{key}", f"unknown key; allowed keys are: {', '.join(SCHEDULE_KEYS)}")
    for key in SCHEDULE_KEYS:
        given = value.get(key, min(I2I_DEFAULT, steps) if key == "i2i" else steps)
        if not _whole(given, 0, steps):  # a switch is on for steps s < value: more than `steps` means nothing
            problems.add(f"options.schedule.{key}", f"must be a whole number of steps from 0 to {steps} "
                                                    f"(options.steps), got {given!r:.40}")
        out[key] = given
    return out


def _check_seed(value: Any, name: str, problems: _Problems) -> None:
    """The engine's own seed check (0..2^64-1, as `threedis render` takes), as a problem of field `name`."""
    try:
        check_seed(value, name)
    except UserError as err:
        problems.add(name, str(err).removeprefix(f"{name} ").removeprefix("= "))


def _check_stage1(value: Any, defaults: Defaults, problems: _Problems) -> dict:
    from threedis.engine.sizes import parse_size

    value = value if value is not None else {}
    if not isinstance(value, dict):
        problems.add("options.depth.stage1", "must be an object {steps?, size?, seed?, migc_steps?, refine_steps?, "
                                             "guidance?}")
        return {}
    allowed = ("steps", "size", "seed", "migc_steps", "refine_steps", "guidance")
    for key in value:
        if key not in allowed:
            problems.add(f"options.depth.stage1.{key}", f"unknown key; allowed: {', '.join(allowed)}")
    out = {"steps": value.get("steps", defaults.stage1_steps), "size": value.get("size", defaults.stage1_size),
           "seed": value.get("seed"), "migc_steps": value.get("migc_steps"), "guidance": value.get("guidance", 6.5),
           "refine_steps": value.get("refine_steps")}
    if not _whole(out["steps"], 1, MAX_STEPS):
        problems.add("options.depth.stage1.steps", f"must be a whole number from 1 to {MAX_STEPS}")
    elif out["migc_steps"] is None:
        out["migc_steps"] = min(defaults.stage1_migc_steps, out["steps"])
    if out["migc_steps"] is not None and not _whole(out["migc_steps"], 0, MAX_STEPS):
        problems.add("options.depth.stage1.migc_steps", f"must be a whole number from 0 to {MAX_STEPS}")
    if out["refine_steps"] is not None and not _whole(out["refine_steps"], 0, MAX_STEPS):
        problems.add("options.depth.stage1.refine_steps",
                     f"must be null (every step) or a whole number from 0 (off) to {MAX_STEPS}")
    if out["seed"] is not None:
        _check_seed(out["seed"], "options.depth.stage1.seed", problems)
    if not _number(out["guidance"], 0, 100):
        problems.add("options.depth.stage1.guidance", "must be a number from 0 to 100")
    try:
        out["size"] = list(parse_size(out["size"], "size"))
    except UserError as err:
        problems.add("options.depth.stage1.size", str(err).removeprefix("size "))
    return out


def _check_depth(value: Any, kind: str, defaults: Defaults, uploads: UploadStore, job_exists: Any,
                 problems: _Problems) -> dict:
    sources = DEPTH_SOURCES[kind]
    value = value if value is not None else {"source": "stage1"}
    if not isinstance(value, dict) or value.get("source") not in sources:
        got = value.get("source") if isinstance(value, dict) else value
        problems.add("options.depth.source", f"must be one of {', '.join(sources)}, got {got!r:.40}")
        return {"source": "stage1"}
    source = value["source"]
    keys = {"stage1": ("source", "stage1"), "job": ("source", "job")}.get(source, ("source", "upload"))
    for key in value:
        if key not in keys:
            problems.add(f"options.depth.{key}", f"unknown key for source {source!r}; allowed: {', '.join(keys)}"
                         + ("; the service reads no paths" if key == "path" else ""))
    if source == "stage1":
        return {"source": source, "stage1": _check_stage1(value.get("stage1"), defaults, problems)}
    if source == "job":
        job = value.get("job")
        if not isinstance(job, str) or not job_exists(job):
            problems.add("options.depth.job", f"no depth job with id {job!r:.40}; POST /api/v1/depth first")
        return {"source": source, "job": job}
    upload = value.get("upload")
    if upload is None:
        problems.add("options.depth.upload", f"missing; give the id of a {'photo' if source == 'photo' else 'depth'} "
                                             f"image POSTed to /api/v1/uploads")
        return {"source": source, "upload": upload}
    try:
        uploads.get(upload, "photo" if source == "photo" else "depth", "options.depth.upload")
    except UploadError as err:
        problems.add("options.depth.upload", str(err).removeprefix("options.depth.upload: "))
    return {"source": source, "upload": upload}


def _check_loras(value: Any, problems: _Problems) -> list[dict]:
    """[{name | upload, scale}]: a LoRA of the service's --lora-dir by file name, or an uploaded one by id.

    Only the form is checked here; whether the name or upload exists is the LoRA store's
    answer (LoraStore.check). A path is refused: the service reads no client-given paths,
    and telling which paths exist would already say too much about the machine.
    """
    if value is None:
        return []
    if not isinstance(value, list):
        problems.add("options.loras", "must be a list of {name, scale} or {upload, scale}")
        return []
    out = []
    for i, item in enumerate(value):
        name = f"options.loras[{i}]"
        if not isinstance(item, dict):
            problems.add(name, "must be an object {name, scale} or {upload, scale}")
            continue
        unknown = [k for k in item if k not in ("name", "upload", "scale")]
        if "path" in item:
            problems.add(f"{name}.path", "the service reads no paths; name a LoRA of its --lora-dir folder "
                                         "(GET /api/v1/loras) or upload one (POST /api/v1/loras)")
            continue
        if unknown:
            problems.add(f"{name}.{unknown[0]}", "unknown key; allowed: name, upload, scale")
            continue
        keys = [k for k in ("name", "upload") if k in item]
        if len(keys) != 1 or not isinstance(item[keys[0]], str) or not item[keys[0]]:
            problems.add(name, "give exactly one of name (a LoRA of GET /api/v1/loras) or upload (an id)")
            continue
        scale = item.get("scale", 1.0)
        try:  # the engine's one range, which an image's metadata can record (render --from)
            scale = check_lora_scale(scale, "scale")
        except UserError as err:
            problems.add(f"{name}.scale", str(err).removeprefix("scale "))
            continue
        out.append({keys[0]: item[keys[0]], "scale": scale})
    return out


def check_options(value: Any, kind: str, defaults: Defaults, uploads: UploadStore, job_exists: Any,
                  lora_problems: Any = None) -> dict:
    """The request's options with every default filled in; RequestError lists every problem.

    lora_problems(loras) -> [(field, message)]: the LoRA store's check that each named LoRA exists.
    """
    problems = _Problems()
    value = value if value is not None else {}
    if not isinstance(value, dict):
        raise RequestError("options must be an object", [{"field": "options", "message": "must be an object"}])
    allowed = ("seed", "depth") if kind == "depth" else (
        "seed", "steps", "guidance", "schedule", "sam", "depth", "loras", "preview")
    for key in value:
        if key not in allowed:
            problems.add(f"options.{key}", f"unknown option; allowed: {', '.join(allowed)}")
    seed = value.get("seed", 0)
    if seed is None:
        seed = random.SystemRandom().randrange(2**32)
    _check_seed(seed, "options.seed", problems)
    out: dict[str, Any] = {"seed": seed,
                           "depth": _check_depth(value.get("depth"), kind, defaults, uploads, job_exists, problems)}
    if kind == "render":
        steps = value.get("steps", defaults.steps)
        if not _whole(steps, 1, MAX_STEPS):
            problems.add("options.steps", f"must be a whole number from 1 to {MAX_STEPS}, got {steps!r:.40}")
            steps = defaults.steps
        guidance = value.get("guidance", 10.0)
        if not _number(guidance, 0, 100):
            problems.add("options.guidance", f"must be a number from 0 to 100, got {guidance!r:.40}")
        for flag in ("sam", "preview"):
            if not isinstance(value.get(flag, False), bool):
                problems.add(f"options.{flag}", "must be true or false")
        loras = _check_loras(value.get("loras"), problems)
        for name, message in lora_problems(loras) if lora_problems is not None else ():
            problems.add(name, message)
        out.update(steps=steps, guidance=guidance, schedule=_check_schedule(value.get("schedule"), steps, problems),
                   sam=value.get("sam", False), preview=value.get("preview", True), loras=loras)
    problems.raise_any("invalid options")
    return out


def check_request(body: Any, kind: str, defaults: Defaults, uploads: UploadStore, job_exists: Any,
                  lora_problems: Any = None) -> tuple[dict, dict]:
    """(layout as sent, normalised options) of a POST /jobs or /depth body; RequestError if anything is wrong.

    A depth job from a photo needs no prompts (its layout gives only the size).
    """
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object {layout, options}",
                           [{"field": "", "message": "must be an object {layout, options}"}])
    unknown = [k for k in body if k not in ("layout", "options")]
    if unknown:
        raise RequestError(f"unknown key {unknown[0]!r} in the body; send {{layout, options}}",
                           [{"field": k, "message": "unknown key; allowed: layout, options"} for k in unknown])
    if "layout" not in body:
        raise RequestError("the body has no layout", [{"field": "layout", "message": "missing"}])
    problems: list[dict] = []
    message = ""
    options_sent = body.get("options")
    photo = (kind == "depth" and isinstance(options_sent, dict) and isinstance(options_sent.get("depth"), dict)
             and options_sent["depth"].get("source") == "photo")
    try:
        if photo:
            layout_shape(body["layout"], uploads)
        else:  # a stage-1 depth job reads the prompts: an empty one is refused with that reason
            resolve_layout(body["layout"], uploads, empty_prompt_message=STAGE1_NEEDS_PROMPTS if kind == "depth" else None)
    except RequestError as err:
        problems += err.problems  # layout fields as `threedis validate` names them: "instances[1].box"
        message = str(err)
    try:
        options = check_options(options_sent, kind, defaults, uploads, job_exists, lora_problems)
    except RequestError as err:
        problems += err.problems
        message = message or str(err)
    if problems:
        raise RequestError(message, problems)
    return body["layout"], options
