"""Who may talk to the service: the per-install bearer token, the Host check and the Origin check.

A service on someone's desktop is reachable by every web page they open (through
the browser) and every local program. The token stops programs and pages that do
not know it; the Host check stops DNS rebinding (a foreign name that resolves to
127.0.0.1); the Origin check stops other sites' pages from driving the API with a
token they might have learnt. All three run in one ASGI middleware, before routing,
for HTTP and WebSocket alike.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import secrets
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qs

from threedis.engine.errors import UserError
from threedis.engine.paths import make_folder

TOKEN_FILE = ("serve", "token")


def token_path(cache_dir: Path) -> Path:
    return Path(cache_dir).joinpath(*TOKEN_FILE)


def load_or_create_token(cache_dir: Path) -> str:
    """The install's token: read from cache_dir/serve/token, or made once and stored with mode 0600."""
    path = token_path(cache_dir)
    if path.is_file():
        token = path.read_text(encoding="utf-8").strip()
        if token:
            os.chmod(path, 0o600)
            return token
    make_folder(path.parent, "cache folder for the service's token", "set $THREEDIS_CACHE to a folder you can write")
    token = secrets.token_urlsafe(32)
    tmp = path.with_name(f".token-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(token + "\n")
    os.replace(tmp, path)
    return token


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to open the API to the network without a token."""
    if token is None and not is_loopback(host):
        raise UserError(f"--no-auth with --host {host} would let anyone on the network drive the engine; "
                        f"bind 127.0.0.1 or keep the token")


def allowed_hosts(host: str, port: int) -> frozenset[str]:
    """Host header values that name this service: the bound address, and the loopback names when local."""
    names = {host}
    if is_loopback(host) or host in ("0.0.0.0", "::"):
        names |= {"127.0.0.1", "localhost", "[::1]"}
    if ":" in host and not host.startswith("["):
        names.add(f"[{host}]")
    return frozenset(f"{name}:{port}".lower() for name in names)


def own_origins(hosts: frozenset[str]) -> frozenset[str]:
    return frozenset(f"http://{h}" for h in hosts)


def bearer_ok(expected: str | None, header: str | None) -> bool:
    if expected is None:
        return True
    if not header or not header.lower().startswith("bearer "):
        return False
    return hmac.compare_digest(header[7:].strip().encode(), expected.encode())


def query_token_ok(expected: str | None, query_string: bytes) -> bool:
    if expected is None:
        return True
    given = parse_qs(query_string.decode("latin-1")).get("token", [""])[0]
    return hmac.compare_digest(given.encode(), expected.encode())


class BodyTooLarge(Exception):
    """Raised inside receive() when a request body passes its cap."""


ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


class Guard:
    """ASGI middleware: Host, Origin and token checks, and body caps, before any route runs.

    body_limit(path) gives the byte cap of a request's body; a larger one gets 413
    without being read whole.
    """

    def __init__(self, app: ASGIApp, *, host: str, port: int, token: str | None, allow_origins: tuple[str, ...],
                 body_limit: Callable[[str], int], api_prefix: str = "/api/") -> None:
        self.app, self.token, self.api_prefix, self.body_limit = app, token, api_prefix, body_limit
        self.hosts = allowed_hosts(host, port)
        self.origins = own_origins(self.hosts) | {o.rstrip("/").lower() for o in allow_origins}

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "").lower()
        if host not in self.hosts:
            return await self._refuse(scope, send, 421, f"Host {host or '(none)'!s} is not this service's "
                                      f"address; use http://{sorted(self.hosts)[0]}")
        origin = headers.get("origin")
        if origin is not None and origin.rstrip("/").lower() not in self.origins:
            return await self._refuse(scope, send, 403, f"cross-origin request from {origin} refused; start the "
                                      f"service with --allow-origin {origin} to allow it")
        path = scope.get("path", "")
        preflight = scope["type"] == "http" and scope.get("method") == "OPTIONS"
        if path.startswith(self.api_prefix) and not preflight:
            ok = (query_token_ok(self.token, scope.get("query_string", b"")) if scope["type"] == "websocket"
                  else bearer_ok(self.token, headers.get("authorization")))
            if not ok:
                how = "?token=..." if scope["type"] == "websocket" else "the header Authorization: Bearer <token>"
                return await self._refuse(scope, send, 401, f"missing or wrong token; send {how} (the token is "
                                          f"printed by `threedis serve` and stored in its cache folder)")
        if scope["type"] == "http":
            return await self._capped(scope, receive, send, headers)
        return await self.app(scope, receive, send)

    async def _capped(self, scope: dict, receive: Any, send: Any, headers: dict) -> None:
        limit = self.body_limit(scope.get("path", ""))
        length = headers.get("content-length")
        too_big = f"request body too large: the limit is {limit} bytes"
        if length is not None and length.isdigit() and int(length) > limit:
            return await self._refuse(scope, send, 413, too_big)
        seen = 0
        started = False

        async def counted_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge()
            return message

        async def tracked_send(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge:
            if not started:
                await self._refuse(scope, send, 413, too_big)

    async def _refuse(self, scope: dict, send: Any, status: int, message: str) -> None:
        if scope["type"] == "websocket":  # closing before accept: the client sees the handshake refused
            await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})
            return
        body = json.dumps({"detail": {"message": message, "problems": []}}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
