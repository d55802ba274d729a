"""What /system and /plan report: the device and its memory, the engine's choices, the planner's rows."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from threedis import __version__
from threedis.engine.serve.config import ServeConfig
from threedis.engine.serve.engines import READY, EngineHolder
from threedis.engine.serve.requests import RequestError, layout_shape
from threedis.engine.serve.uploads import UploadStore

if TYPE_CHECKING:
    from threedis import Engine

GB = 1024**3
PLAN_KEYS = ("layout", "profile", "stage1", "sam", "photo", "stage1_size")


def _memory(engine: "Engine | None") -> dict[str, float | None]:
    import psutil

    out: dict[str, float | None] = {"vram_free_gb": None, "vram_total_gb": None,
                                    "ram_free_gb": round(psutil.virtual_memory().available / GB, 2)}
    if engine is not None and engine.device.type == "cuda":
        import torch  # imported by the engine already

        free, total = torch.cuda.mem_get_info(engine.device)
        out.update(vram_free_gb=round(free / GB, 2), vram_total_gb=round(total / GB, 2))
    return out


def loaded_models(engine: "Engine | None") -> list[str]:
    """The rendering models in memory now (the auxiliary ones live only for their stage)."""
    if engine is None:  # still loading
        return []
    try:
        return engine.loaded_models()
    except RuntimeError:  # the worker changed the table while we read it; ask again next time
        return []


def system_info(holder: EngineHolder, config: ServeConfig, queue_length: int, running: str | None) -> dict:
    """/system: the engine's description (device, profile, backend, model and reasons) and its state.

    state: "loading" (the page answers, jobs queue, the engine is being built), "ready", or
    "failed" (error says why; the service then takes no jobs).
    """
    engine = holder.engine
    return {
        "version": __version__, "state": holder.state, "error": holder.error, **holder.about, **_memory(engine),
        "models_loaded": loaded_models(engine), "queue_length": queue_length, "running": running,
        "tiny": config.tiny, "limits": config.limits(),
    }


def plan_rows(holder: EngineHolder, body: Any, uploads: UploadStore, stage1_size: int | str = 512) -> dict:
    """Engine.plan for the layout's size and instance count, with a built-in profile (default: the engine's).

    The engine's own checkpoint is priced (the tiny one in tiny mode), with stage 1 at the size a
    job would get (`stage1_size`: the service's default, tiny in tiny mode) unless the body names
    one; photo: the depth estimator runs too. Prompts may be empty: a plan reads none.
    """
    from threedis.engine.profiles import list_profiles
    from threedis.engine.sizes import parse_size

    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object {layout, profile?, stage1?, sam?, photo?, stage1_size?}",
                           [{"field": "", "message": "must be an object"}])
    unknown = [k for k in body if k not in PLAN_KEYS]
    if unknown:
        raise RequestError(f"unknown key {unknown[0]!r}; allowed: {', '.join(PLAN_KEYS)}",
                           [{"field": k, "message": "unknown key"} for k in unknown])
    width, height, count = layout_shape(body.get("layout"), uploads)
    problems = []
    name = body.get("profile")
    if name is not None and (not isinstance(name, str) or name not in list_profiles()):
        problems.append({"field": "profile", "message": f"must be one of {', '.join(list_profiles())} "
                                                        f"(or left out for the service's own)"})
    for flag in ("stage1", "sam", "photo"):
        if not isinstance(body.get(flag, False), bool):
            problems.append({"field": flag, "message": "must be true or false"})
    try:
        stage1_size = parse_size(body.get("stage1_size", stage1_size), "stage1_size")
    except Exception as err:
        problems.append({"field": "stage1_size", "message": str(err)})
    if problems:
        raise RequestError(f"invalid plan request: {problems[0]['field']}: {problems[0]['message']}", problems)
    if holder.state != READY or holder.engine is None:
        message = ("the models are still loading; ask again in a moment" if holder.error is None
                   else f"the models did not load: {holder.error}")
        raise RequestError(message, [{"field": "", "message": message}], status=503)
    plan = holder.engine.plan(width, height, count, stage1=body.get("stage1", False), sam=body.get("sam", False),
                              depth_from_photo=body.get("photo", False), stage1_size=stage1_size, profile=name)
    return plan.to_dict()
