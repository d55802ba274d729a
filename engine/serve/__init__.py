"""`threedis serve`: a local HTTP + WebSocket service around one Engine, and the web editor's files.

This package owns everything between a client and the public engine API: the routes
(app.py), the FIFO job queue and its single render worker (jobs.py), the engine built
in the background (engines.py), the job history in SQLite (history.py), validated image
uploads (uploads.py), the LoRAs jobs may name (loras.py), event fan-out to WebSocket
clients (events.py), request parsing (requests.py), the token / session cookie / Host /
Origin guard and security headers (security.py), and the command's checks and uvicorn
(server.py); one service per output folder is the project's folder lock (engine/locks.py). It reaches the engine only
through the public `Engine` (render, depth_from_layout, depth_from_image, plan, load_lora,
unload_loras, loaded_models), `Layout`, `RenderOptions`, `Stage1Options` and `UserError`,
and the checks every reader shares (checks.check_seed, loading.safetensors_header). FastAPI and uvicorn are the
optional extra `threedis-flux[serve]`; nothing here is imported by the engine itself.
"""

from __future__ import annotations

from typing import Any, Callable

from threedis.engine.serve.config import ServeConfig

__all__ = ["ServeConfig", "create_app"]


def create_app(config: ServeConfig, engine_factory: Callable[[], Any] | None = None,
               on_loaded: Callable[[Any], None] | None = None) -> Any:
    """The FastAPI app for `config` (imported lazily: FastAPI is an optional extra)."""
    from threedis.engine.serve.app import create_app as _create

    return _create(config, engine_factory=engine_factory, on_loaded=on_loaded)
