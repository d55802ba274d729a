"""Starting the service: argument checks, the token, the listening socket, then uvicorn on one worker.

Everything a user can get wrong on the command line (numbers, the token file, a port
in use, an address that is not this machine's) is found here first, in one line with
exit code 2, before FastAPI or torch is imported. The socket bound for that check is
the one uvicorn serves on, so nothing can take the port in between. The page answers
at once; the render worker builds the engine meanwhile, and a build that fails ends
the service with its one-line error (exit 2).
"""

from __future__ import annotations

import errno
import logging
import math
import socket
import threading
import webbrowser
from pathlib import Path
from typing import Any
from urllib.parse import quote

from threedis.engine.errors import UserError
from threedis.engine.serve.config import MB, ServeConfig
from threedis.engine.serve.security import check_bind

INSTALL_HINT = 'threedis serve needs FastAPI and uvicorn: pip install "threedis-flux[serve]"'


def require_dependencies() -> None:
    """One clear line instead of an ImportError when the optional extra is missing (found, not imported)."""
    # python-multipart (uploads) is importable as python_multipart (new) or multipart (old)
    wanted = ("fastapi", "uvicorn", ("python_multipart", "multipart"))
    for names in wanted:
        if not any(_importable(name) for name in ((names,) if isinstance(names, str) else names)):
            raise UserError(INSTALL_HINT)


def _importable(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules (tests) or a broken install
        return False


def url_of(config: ServeConfig) -> str:
    host = f"[{config.host}]" if ":" in config.host else config.host
    return f"http://{host}:{config.port}/"


def sign_in_url(config: ServeConfig) -> str:
    """The editor's URL with the token, once: the page trades it for a session cookie and drops it."""
    return url_of(config) + (f"?token={quote(config.token, safe='')}" if config.token else "")


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or one UserError line: port in use, no permission, not our address."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as err:
        raise UserError(f"--host {host}: not an address or a name this machine can resolve "
                        f"({getattr(err, 'strerror', None) or err}); use 127.0.0.1 or one of this machine's "
                        f"addresses") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart reuses the port at once
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise UserError(f"--port {port}: the port is already in use on {host} (another threedis serve?); "
                            f"stop that program or pass another --port") from None
        if err.errno in (errno.EACCES, errno.EPERM):
            raise UserError(f"--port {port}: not allowed to listen on it (ports below 1024 need root); "
                            f"pass --port 7860 or another above 1023") from None
        if err.errno == errno.EADDRNOTAVAIL:
            raise UserError(f"--host {host}: not an address of this machine; use 127.0.0.1, or the address "
                            f"of one of its network interfaces") from None
        raise UserError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    sock.set_inheritable(True)
    return sock


def config_from_args(args: Any) -> ServeConfig:
    """ServeConfig from `threedis serve`'s arguments (the token made or read here). Imports nothing heavy."""
    from threedis.engine.paths import cache_root, make_folder
    from threedis.engine.serve.security import load_or_create_token

    for flag, value in (("--max-upload-mb", args.max_upload_mb), ("--max-upload-pixels", args.max_upload_pixels),
                        ("--max-lora-mb", args.max_lora_mb)):
        if not math.isfinite(value) or value <= 0:
            raise UserError(f"{flag} must be a positive number, got {value}")
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be 1..65535, got {args.port}")
    lora_dir = None
    if args.lora_dir is not None:
        lora_dir = Path(args.lora_dir).expanduser().resolve()
        if not lora_dir.is_dir():
            raise UserError(f"--lora-dir {args.lora_dir}: not a folder; give the folder that holds your "
                            f".safetensors LoRAs")
    check_bind(args.host, None if args.no_auth else "token")
    out = make_folder(args.out, "output folder", "choose another --out").resolve()  # before anything starts
    token = None if args.no_auth else load_or_create_token(cache_root())
    return ServeConfig(
        out=out, host=args.host, port=args.port, token=token, model=args.model,
        profile=args.profile, stage1=args.stage1, sam=args.sam, depth_model=args.depth_model,
        device=None if args.device is None else str(args.device), local_files_only=args.local_files_only,
        allow_origins=tuple(args.allow_origin), max_upload_bytes=int(args.max_upload_mb * MB),
        max_upload_pixels=int(args.max_upload_pixels), max_lora_bytes=int(args.max_lora_mb * MB), lora_dir=lora_dir,
    )


def main(args: Any) -> int:
    """`threedis serve`: checks (one line each, exit 2), then serve until Ctrl-C."""
    require_dependencies()
    config = config_from_args(args)
    sock = bind_socket(config.host, config.port)
    try:
        serve(config, sock, open_browser=args.open)
    finally:
        sock.close()
    return 0


def serve(config: ServeConfig, sock: socket.socket, open_browser: bool = False, log_level: str = "info") -> None:
    """Serve `config` on the bound `sock`: the page at once, the engine built in the background."""
    import uvicorn

    from threedis.engine.serve.app import create_app
    from threedis.engine.serve.engines import READY, EngineHolder

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    failure: list[str] = []
    server: uvicorn.Server | None = None

    def loaded(holder: EngineHolder) -> None:
        if holder.state == READY:
            about = holder.about
            print(f"  models ready: profile {about['profile']} ({about['profile_reason']}); attention backend "
                  f"{about['backend']}; device {about['device']}", flush=True)
            return
        failure.append(holder.error or "the models did not load")
        if server is not None:
            server.should_exit = True

    app = create_app(config, on_loaded=loaded)
    what = "the tiny built-in checkpoints (noise-like pictures; pass --model for real ones)" if config.tiny \
        else config.model
    print(f"threedis serve: {sign_in_url(config)}", flush=True)
    print(f"  serving {what}; outputs in {config.out}; loading the models in the background", flush=True)
    if config.token:
        print("  open the address above once: the page keeps a session; programs send "
              "'Authorization: Bearer <token>' (the token is the address's ?token=)", flush=True)
    else:
        print("  --no-auth: the API and the page take requests without a token", flush=True)
    if open_browser:
        threading.Timer(1.0, webbrowser.open, args=(sign_in_url(config),)).start()
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, ws="auto", lifespan="on", workers=1))
    server.run(sockets=[sock])
    if failure:
        raise UserError(failure[0])
