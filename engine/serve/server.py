"""Starting the service: the token, the bind check, the URL line, uvicorn on one worker."""

from __future__ import annotations

import logging
import threading
import webbrowser
from typing import Any

from threedis.engine.serve.config import ServeConfig
from threedis.engine.serve.security import check_bind

INSTALL_HINT = 'threedis serve needs FastAPI and uvicorn: pip install "threedis-flux[serve]"'


def require_dependencies() -> None:
    """One clear line instead of an ImportError when the optional extra is missing."""
    from threedis.engine.errors import UserError

    try:
        import fastapi  # noqa: F401
        import multipart  # noqa: F401  (python-multipart: uploads)
        import uvicorn  # noqa: F401
    except ImportError:
        raise UserError(INSTALL_HINT) from None


def url_of(config: ServeConfig) -> str:
    host = f"[{config.host}]" if ":" in config.host else config.host
    return f"http://{host}:{config.port}/"


def serve(config: ServeConfig, open_browser: bool = False, log_level: str = "info") -> None:
    """Build the app (checks the model now), print where it is, run until Ctrl-C."""
    require_dependencies()
    check_bind(config.host, config.token)
    import uvicorn

    from threedis.engine.serve.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app = create_app(config)
    url = url_of(config)
    engine = app.state.jobs.engine
    what = "the tiny built-in checkpoints (noise-like pictures; pass --model for real ones)" if config.tiny \
        else engine.model_id
    print(f"threedis serve: {url}  serving {what}", flush=True)
    print(f"  profile {engine.profile.name} ({engine.profile.origin or 'built-in'}); "
          f"attention backend {engine.backend}; outputs in {config.out}", flush=True)
    if config.token:
        print(f"  token: {config.token}  (send 'Authorization: Bearer <token>'; the page has it)", flush=True)
    else:
        print("  --no-auth: the API takes requests without a token", flush=True)
    if open_browser:
        threading.Timer(1.0, webbrowser.open, args=(url,)).start()
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level=log_level,
                                           ws="auto", lifespan="on", workers=1))
    server.run()


def config_from_args(args: Any) -> ServeConfig:
    """ServeConfig from `threedis serve`'s arguments (the token made or read here)."""
    from threedis.engine.api import default_cache_dir
    from threedis.engine.errors import UserError
    from threedis.engine.serve.config import MB
    from threedis.engine.serve.security import load_or_create_token

    for flag, value in (("--max-upload-mb", args.max_upload_mb), ("--max-upload-pixels", args.max_upload_pixels)):
        if value <= 0:
            raise UserError(f"{flag} must be positive, got {value}")
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be 1..65535, got {args.port}")
    from threedis.engine.paths import make_folder

    out = make_folder(args.out, "output folder", "choose another --out").resolve()  # before anything starts
    token = None if args.no_auth else load_or_create_token(default_cache_dir())
    return ServeConfig(
        out=out, host=args.host, port=args.port, token=token, model=args.model,
        profile=args.profile, stage1=args.stage1, sam=args.sam, depth_model=args.depth_model, device=args.device,
        local_files_only=args.local_files_only, allow_origins=tuple(args.allow_origin),
        max_upload_bytes=int(args.max_upload_mb * MB), max_upload_pixels=args.max_upload_pixels,
    )
