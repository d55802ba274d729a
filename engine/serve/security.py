"""Who may talk to the service: the per-install token, its session cookie, the Host and Origin checks.

A service on someone's desktop is reachable by every web page they open (through
the browser) and, with --host, by every machine on the network. The token stops
programs and pages that do not know it; the page itself is served only to a browser
that has shown it once (`/?token=...` or the sign-in form), which then holds an
HttpOnly, SameSite=Strict cookie derived from the token, so no script and no other
site can read or replay it. The Host check stops DNS rebinding (a foreign name that
resolves to 127.0.0.1); the Origin check stops other sites' pages from driving the API.
All of it runs in one ASGI middleware, before routing, for HTTP and WebSocket alike; it
also caps request bodies, sends the framing and content-type headers, and keeps the
token out of every log line.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import warnings
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qs, quote, unquote_plus

from threedis.engine.errors import ThreedisWarning, UserError
from threedis.engine.outputs import replace_file
from threedis.engine.paths import make_folder

TOKEN_FILE = ("serve", "token")
_TOKEN_TEXT = re.compile(r"[\x21-\x7e]{16,512}")  # printable ASCII, no spaces: fits a header, a URL and a form
SESSION_PURPOSE = b"threedis serve session v1"
SESSION_MAX_AGE_S = 30 * 24 * 3600
WS_AUTH_CLOSE = 4401  # WebSocket close code after accept: 4000 + the HTTP status it stands for (401)
_SECRET_IN_TEXT = re.compile(r"(token=)[^&\s\"']+", re.IGNORECASE)
# A query parameter as it reaches a log line: undecoded, so "%74oken=" is a token too (Starlette decodes it)
_QUERY_PARAM = re.compile(r"(?P<lead>[?&;])(?P<name>[^=&;\s\"'#]+)=(?P<value>[^&;\s\"'#]*)")

# The editor's own files only: no inline script, no other origin, no framing.
EDITOR_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
              "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = (
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),  # not no-referrer: Chromium then sends "Origin: null" with form posts
)


def token_path(cache_dir: Path) -> Path:
    return Path(cache_dir).joinpath(*TOKEN_FILE)


def _read_token(path: Path) -> tuple[str | None, str]:
    """(the token in `path`, "") or (None, why it cannot be used)."""
    try:
        text = path.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        return None, "is not UTF-8 text"
    except OSError as err:
        raise UserError(f"cannot read the token file {path}: {err.strerror or err}; fix its permissions or "
                        f"remove it (a new token is made)") from None
    if not _TOKEN_TEXT.fullmatch(text):
        return None, "is empty" if not text else "does not hold a token (16..512 printable characters, no spaces)"
    return text, ""


def load_or_create_token(cache_dir: Path) -> str:
    """The install's token: read from cache_dir/serve/token, or made once and stored with mode 0600.

    A token file that cannot be a token (not UTF-8, empty, binary) is replaced with a warning;
    a folder in its place, or a cache folder that cannot be written, is one UserError line.
    """
    path = token_path(cache_dir)
    if path.is_dir():
        raise UserError(f"the token file {path} is a folder; remove it (a new token is then made) or set "
                        f"THREEDIS_CACHE to another folder")
    if path.exists():
        token, why = _read_token(path)
        if token is not None:
            os.chmod(path, 0o600)
            return token
        warnings.warn(f"the token file {path} {why}; replacing it with a new token", ThreedisWarning, stacklevel=2)
    make_folder(path.parent, "cache folder for the service's token", "set $THREEDIS_CACHE to a folder you can write")
    token = secrets.token_urlsafe(32)
    try:
        replace_file(path, (token + "\n").encode(), f"the token file {path}", mode=0o600)
    except UserError as err:
        raise UserError(f"{err} (the folder: $THREEDIS_CACHE)") from None
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


def redact(text: str, secrets: frozenset[str] = frozenset()) -> str:
    """`text` with every token=... value (the name spelled in any case or percent-encoding) replaced by ***,
    and every one of `secrets` (as typed or percent-encoded) too, wherever it stands."""
    def hide(match: re.Match) -> str:
        if unquote_plus(match["name"]).strip().lower() == "token":
            return f"{match['lead']}{match['name']}=***"
        return match.group(0)

    text = _SECRET_IN_TEXT.sub(r"\1***", _QUERY_PARAM.sub(hide, text))
    for secret in secrets:
        for form in {secret, quote(secret, safe="")}:
            text = text.replace(form, "***")
    return text


class RedactSecrets(logging.Filter):
    """Rewrites a log record whose message or arguments carry token=... or one of the service's tokens.

    The arguments keep their shape: uvicorn's access formatter unpacks them. `secrets` grows as
    services start in this process (each adds its own token), so none of them reaches a log line.
    """

    def __init__(self) -> None:
        super().__init__()
        self.secrets: frozenset[str] = frozenset()

    def _clean(self, value: Any) -> Any:
        return redact(value, self.secrets) if isinstance(value, str) else value

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = self._clean(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(self._clean(a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: self._clean(v) for k, v in record.args.items()}
        return True


def install_log_redaction(secrets: tuple[str | None, ...] = (),
                          names: tuple[str, ...] = ("uvicorn.access", "uvicorn.error", "threedis.serve")) -> None:
    """Add one RedactSecrets to uvicorn's and our loggers (idempotent) and teach it `secrets`."""
    known = frozenset(s for s in secrets if s)
    for name in names:
        logger = logging.getLogger(name)
        found = next((f for f in logger.filters if isinstance(f, RedactSecrets)), None)
        if found is None:
            found = RedactSecrets()
            logger.addFilter(found)
        found.secrets = found.secrets | known


def _cookies(header: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in (header or "").split(";"):
        name, eq, value = part.strip().partition("=")
        if eq and name:
            out.setdefault(name, value.strip().strip('"'))
    return out


class Auth:
    """The token, and the session cookie the page gets for it (an HMAC of the token, not the token).

    The cookie's name carries the port: cookies are shared by every port of a host, and two
    services on one machine must not overwrite each other's session.
    """

    def __init__(self, token: str | None, port: int) -> None:
        self.token = token
        self.cookie_name = f"threedis-session-{port}"
        self._session = hmac.new(token.encode(), SESSION_PURPOSE, hashlib.sha256).hexdigest() if token else None

    @property
    def required(self) -> bool:
        return self.token is not None

    def token_ok(self, given: Any) -> bool:
        if self.token is None:
            return True
        return isinstance(given, str) and hmac.compare_digest(given.encode(), self.token.encode())

    def bearer_ok(self, header: str | None) -> bool:
        if self.token is None:
            return True
        if not header or not header.lower().startswith("bearer "):
            return False
        return self.token_ok(header[7:].strip())

    def cookie_ok(self, cookie_header: str | None) -> bool:
        if self._session is None:
            return True
        given = _cookies(cookie_header).get(self.cookie_name, "")
        return hmac.compare_digest(given.encode(), self._session.encode())

    def request_ok(self, headers: dict[str, str]) -> bool:
        """The bearer header (programs) or the session cookie (the page)."""
        return self.bearer_ok(headers.get("authorization")) or self.cookie_ok(headers.get("cookie"))

    def set_cookie(self) -> str:
        """The Set-Cookie value that signs this browser in."""
        return (f"{self.cookie_name}={self._session or ''}; Path=/; HttpOnly; SameSite=Strict; "
                f"Max-Age={SESSION_MAX_AGE_S}")


ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]
AUTHENTICATED = "threedis.authenticated"  # scope key: the WebSocket showed the header or the cookie


class Guard:
    """ASGI middleware: Host, Origin and token checks, body caps and security headers, before any route.

    Status codes, one rule for HTTP and the WebSocket handshake alike: 421 a foreign Host,
    403 a foreign Origin, 401 no or a wrong token (the WebSocket's handshake is answered
    with that HTTP status too), 413 a body over body_limit(path), however it is sent.
    A WebSocket with a wrong header gets 401 at the handshake; one without the header or a
    valid cookie is let through unauthenticated: its route then wants the token as the first
    message (and closes with 4401 without it).
    """

    def __init__(self, app: ASGIApp, *, host: str, port: int, auth: Auth, allow_origins: tuple[str, ...],
                 body_limit: Callable[[str], int], api_prefix: str = "/api/") -> None:
        self.app, self.auth, self.api_prefix, self.body_limit = app, auth, api_prefix, body_limit
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
        api = path.startswith(self.api_prefix)
        if scope["type"] == "websocket":
            if api and "token" in parse_qs(scope.get("query_string", b"").decode("latin-1")):
                return await self._refuse(scope, send, 401, "a token in the URL is refused (URLs reach logs); send "
                                          "the header Authorization: Bearer <token>, or the first message "
                                          '{"type": "auth", "token": "<token>"}')
            if api and "authorization" in headers and not self.auth.bearer_ok(headers["authorization"]):
                return await self._refuse(scope, send, 401, "wrong token in the header Authorization: Bearer "
                                          "<token> (the token is printed by `threedis serve`)")
            scope[AUTHENTICATED] = self.auth.request_ok(headers)
            return await self.app(scope, receive, send)
        preflight = scope.get("method") == "OPTIONS"
        if api and not preflight and not self.auth.request_ok(headers):
            return await self._refuse(scope, send, 401, "missing or wrong token; send the header Authorization: "
                                      "Bearer <token> (the token is printed by `threedis serve` and stored in its "
                                      "cache folder)")
        return await self._capped(scope, receive, _with_security_headers(send), headers)

    async def _capped(self, scope: dict, receive: Any, send: Any, headers: dict) -> None:
        """Run the app with the body capped: past the cap it sees a disconnect, and the client gets 413."""
        limit = self.body_limit(scope.get("path", ""))
        length = headers.get("content-length")
        too_big = f"request body too large: the limit is {limit} bytes"
        if length is not None and length.isdigit() and int(length) > limit:
            return await self._refuse(scope, send, 413, too_big)
        seen, over, started = 0, False, False

        async def counted_receive() -> dict:
            nonlocal seen, over
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # a chunked body has no length to check up front
                    over = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: dict) -> None:
            nonlocal started
            if over:  # whatever the app answers to a body it never got whole (FastAPI: 400) is replaced
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not over:
                raise
        if over and not started:
            await self._refuse(scope, send, 413, too_big)

    async def _refuse(self, scope: dict, send: Any, status: int, message: str) -> None:
        body = json.dumps({"detail": {"message": message, "problems": []}}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        if scope["type"] == "websocket":
            if "websocket.http.response" in scope.get("extensions", {}):  # the handshake answered with `status`
                await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
                await send({"type": "websocket.http.response.body", "body": body})
            else:  # a server without the denial extension: the handshake is refused (403)
                await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})
            return
        await _with_security_headers(send)({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _with_security_headers(send: Any) -> Any:
    """send() that adds the framing, sniffing, referrer and CSP headers to a response lacking them."""

    async def sending(message: dict) -> None:
        if message["type"] == "http.response.start":
            present = {name.lower() for name, _ in message.get("headers", [])}
            extra = [(n, v) for n, v in SECURITY_HEADERS if n not in present]
            if b"content-security-policy" not in present:
                extra.append((b"content-security-policy", EDITOR_CSP.encode()))
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    return sending
