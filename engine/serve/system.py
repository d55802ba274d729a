"""What /system and /plan report: the device and its memory, the engine's choices, the planner's rows."""

from __future__ import annotations


from threedis import Engine, Layout, __version__
from threedis.engine.serve.config import ServeConfig
from threedis.engine.serve.requests import RequestError

GB = 1024**3


def _memory(engine: Engine | None) -> dict[str, float | None]:
    import psutil
    import torch

    out: dict[str, float | None] = {"vram_free_gb": None, "vram_total_gb": None,
                                    "ram_free_gb": round(psutil.virtual_memory().available / GB, 2)}
    if engine is not None and engine.device.type == "cuda" and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(engine.device)
        out.update(vram_free_gb=round(free / GB, 2), vram_total_gb=round(total / GB, 2))
    return out


def loaded_models(engine: Engine | None) -> list[str]:
    """The rendering models in memory now (the auxiliary ones live only for their stage)."""
    if engine is None:  # being rebuilt for other LoRAs
        return []
    try:
        return engine.loaded_models()
    except RuntimeError:  # the worker changed the table while we read it; ask again next time
        return []


def system_info(engine: Engine | None, about: dict, config: ServeConfig, queue_length: int,
                running: str | None) -> dict:
    """/system: `about` is the engine's description (device, profile, backend, model and reasons)."""
    return {
        "version": __version__, **about, **_memory(engine), "models_loaded": loaded_models(engine),
        "queue_length": queue_length, "running": running, "tiny": config.tiny, "limits": config.limits(),
    }


def plan_rows(engine: Engine, layout: Layout, body: dict) -> dict:
    """planner.plan for the layout with a built-in profile (default: the engine's own), as JSON."""
    from threedis.engine.planner import models_for, plan
    from threedis.engine.profiles import list_profiles, load_profile
    from threedis.engine.sizes import parse_size

    problems = []
    name = body.get("profile")
    if name is not None and (not isinstance(name, str) or name not in list_profiles()):
        problems.append({"field": "profile", "message": f"must be one of {', '.join(list_profiles())} "
                                                        f"(or left out for the service's own)"})
    for flag in ("stage1", "sam"):
        if not isinstance(body.get(flag, False), bool):
            problems.append({"field": flag, "message": "must be true or false"})
    try:
        stage1_size = parse_size(body.get("stage1_size", 512), "stage1_size")
    except Exception as err:
        problems.append({"field": "stage1_size", "message": str(err)})
    if problems:
        raise RequestError(f"invalid plan request: {problems[0]['field']}: {problems[0]['message']}", problems)
    if name is None and engine is None:
        raise RequestError("the engine is being rebuilt for other LoRAs; name a profile or ask again",
                           [{"field": "profile", "message": "give a built-in profile name"}], status=503)
    profile = load_profile(name) if name is not None else engine.profile
    models = models_for(stage1=body.get("stage1", False), sam2=body.get("sam", False))
    result = plan(profile, layout.width, layout.height, len(layout.instances), models=models,
                  stage1_size=stage1_size)
    return result.to_dict()
