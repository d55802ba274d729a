"""Which Engine the service runs (the user's model, or the tiny built-in checkpoints as `threedis demo`),
built in the background so the page answers at once, and the LoRAs the last job asked for.

Building the engine imports torch and diffusers and checks the checkpoint (seconds to
tens of seconds); the render worker does it before its first job, while the service
already serves the page, which shows "loading models" until `state` is "ready". A
build that fails leaves `state` "failed" with its one-line error. Nothing here is
imported before the build: the service starts without torch.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from threedis.engine.errors import UserError
from threedis.engine.serve.config import ServeConfig

if TYPE_CHECKING:
    from threedis import Engine

log = logging.getLogger("threedis.serve")
LOADING, READY, FAILED = "loading", "ready", "failed"


def tiny_checkpoints() -> dict[str, str]:
    """Paths of the tiny random-weight checkpoints (written once to the cache). The one import site of them."""
    from threedis.engine.tiny import tiny_flux_path
    from threedis.engine.tiny.depth import tiny_depth_anything_path
    from threedis.engine.tiny.ldm3d import tiny_ldm3d_path
    from threedis.engine.tiny.sam2 import tiny_sam2_path

    return {"model": str(tiny_flux_path()), "stage1": str(tiny_ldm3d_path()), "sam": str(tiny_sam2_path()),
            "depth_model": str(tiny_depth_anything_path())}


def engine_arguments(config: ServeConfig) -> dict[str, Any]:
    """Engine.from_pretrained's arguments for this service."""
    if config.tiny:
        paths = tiny_checkpoints()
        return {"path_or_id": paths["model"], "profile": config.profile, "device": config.device,
                "stage1": config.stage1 or paths["stage1"], "sam": config.sam or paths["sam"],
                "depth_estimator": config.depth_model or paths["depth_model"], "local_files_only": True}
    return {"path_or_id": config.model, "profile": config.profile, "device": config.device,
            "stage1": config.stage1 or "auto", "sam": config.sam, "depth_estimator": config.depth_model,
            "local_files_only": config.local_files_only}


def default_factory(config: ServeConfig) -> Callable[[], "Engine"]:
    def build() -> "Engine":
        from threedis import Engine

        return Engine.from_pretrained(**engine_arguments(config))

    return build


def internal_error(exc: BaseException) -> str:
    """What a client is told of an unexpected exception (a bug, a broken install): one line; the
    traceback goes to the service log, which the caller writes."""
    first = (str(exc).splitlines() or [""])[0][:200]
    return f"internal error ({type(exc).__name__}: {first}); see the service log"


class EngineHolder:
    """The service's one Engine once built, what /system says about it, and its current LoRAs."""

    def __init__(self, factory: Callable[[], "Engine"], config: ServeConfig) -> None:
        self._factory = factory
        self.engine: Engine | None = None
        self.state = LOADING
        self.error: str | None = None
        self.about: dict[str, Any] = {"device": config.device or "auto", "profile": config.profile,
                                      "profile_reason": "the models are loading", "backend": None,
                                      "backend_reason": None, "model": config.model or "tiny built-in checkpoints"}
        self.loaded = threading.Event()  # set when state leaves "loading"

    def load(self) -> bool:
        """Build the engine (in the worker thread); False, with `error` set, when it cannot be built."""
        try:
            engine = self._factory()
        except UserError as err:
            self.error = " ".join(str(err).split())
        except Exception as exc:  # a bug or a broken install: the log has the traceback, the page one line
            log.exception("the engine could not be built")
            self.error = internal_error(exc)
        else:
            self.engine = engine
            self.about = {"device": str(engine.device), "profile": engine.profile.name,
                          "profile_reason": engine.profile.origin or "built-in", "backend": engine.backend,
                          "backend_reason": engine.backend_reason, "model": engine.model_id}
        self.state = READY if self.engine is not None else FAILED
        self.loaded.set()
        return self.engine is not None

    def with_loras(self, loras: list[tuple[Path, float]]) -> "Engine":
        """The engine with exactly these LoRAs (file, scale): the previous set is unloaded first."""
        engine = self.engine
        if engine is None:
            raise UserError(f"the models did not load: {self.error or 'still loading'}")
        wanted = [(str(Path(path).expanduser().resolve()), float(scale)) for path, scale in loras]
        if wanted != [(item["path"], item["scale"]) for item in engine.loras]:  # what the engine has loaded
            engine.unload_loras()
            for path, scale in wanted:
                engine.load_lora(path, scale=scale)
        return engine
