"""Which Engine the service runs: the user's model, or the tiny built-in checkpoints as `threedis demo`.

The engine is built once at start-up (it checks the checkpoint; models load at the
first render). A job asking for a different set of LoRAs gets a fresh engine, since
a LoRA cannot be taken out of a loaded transformer; the previous one is dropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from threedis import Engine
from threedis.engine.serve.config import ServeConfig


def tiny_checkpoints() -> dict[str, str]:
    """Paths of the tiny random-weight checkpoints (written once to the cache). The one import site of them."""
    from threedis.engine.tiny.ldm3d import tiny_ldm3d_path
    from threedis.engine.tiny import tiny_flux_path
    from threedis.engine.tiny.depth import tiny_depth_anything_path
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


def default_factory(config: ServeConfig) -> Callable[[], Engine]:
    arguments = engine_arguments(config)
    return lambda: Engine.from_pretrained(**arguments)


class EngineHolder:
    """The service's one Engine, with the LoRAs the last job asked for."""

    def __init__(self, factory: Callable[[], Engine]) -> None:
        self._factory = factory
        self.engine: Engine | None = None
        self.about: dict[str, str] = {}
        self._build()
        self._loras: list[tuple[str, float]] = []

    def _build(self) -> None:
        self.engine = self._factory()
        engine = self.engine
        # what /system shows, kept so it can answer while a LoRA change rebuilds the engine
        self.about = {"device": str(engine.device), "profile": engine.profile.name,
                      "profile_reason": engine.profile.origin or "built-in", "backend": engine.backend,
                      "backend_reason": engine.backend_reason, "model": engine.model_id}

    def with_loras(self, loras: list[dict]) -> Engine:
        """The engine with exactly these LoRAs (a new engine when they differ from the loaded ones)."""
        wanted = [(str(Path(item["path"]).expanduser().resolve()), float(item["scale"])) for item in loras]
        if wanted != self._loras:
            if self._loras:
                self.engine = None  # free the old models before the new engine loads its own
                self._build()
            self._loras = []
            for path, scale in wanted:
                self.engine.load_lora(path, scale=scale)
                self._loras.append((path, scale))
        return self.engine
