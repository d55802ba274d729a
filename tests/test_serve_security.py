"""`threedis serve`'s guard over real HTTP and WebSocket: the token, the page's session cookie, framing
and content-type headers, status codes, secrets kept out of logs, the output-folder lock, and the
command's checks before anything heavy loads.

The module's service has an engine that cannot be built (its factory raises), so it starts in
well under a second: nothing here renders. Every probe is one request; bounds only stop a hang.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
import httpx  # noqa: E402

from serve_helpers import EventLog, free_port, running_service  # noqa: E402

TOKEN = "security-token-0123456789"


def _no_engine():
    from threedis import UserError

    raise UserError("no engine in this test")


def _config(out: Path, **changes):
    from threedis.engine.serve import ServeConfig

    values = dict(out=out, host="127.0.0.1", port=free_port(), token=TOKEN, max_json_bytes=16384)
    values.update(changes)
    return ServeConfig(**values)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """(base url, config) of one service whose engine failed to build: the guard and the page still answer."""
    config = _config(tmp_path_factory.mktemp("serve-security"))
    with running_service(config, engine_factory=_no_engine) as (url, app):
        assert app.state.jobs.holder.state == "failed"
        yield url, config


def _plain(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=30, follow_redirects=False)


# ---------------------------------------------------------------------------- the page and its session


def test_the_page_needs_the_token_once_then_a_session_cookie(service):
    url, config = service
    cookie_name = f"threedis-session-{config.port}"
    with _plain(url) as browser:
        asked = browser.get("/")
        assert asked.status_code == 401 and 'action="/login"' in asked.text  # it asks for the token
        assert TOKEN not in asked.text and "threedis-token" not in asked.text
        wrong = browser.get("/", params={"token": "not-it"})
        assert wrong.status_code == 401 and "not this service's token" in wrong.text
        assert cookie_name not in wrong.headers.get("set-cookie", "")

        signed = browser.get("/", params={"token": TOKEN})
        assert signed.status_code == 303 and signed.headers["location"] == "/"  # the token leaves the address bar
        cookie = signed.headers["set-cookie"]
        assert cookie.startswith(f"{cookie_name}=")
        for attribute in ("HttpOnly", "SameSite=Strict", "Path=/"):
            assert attribute.lower() in cookie.lower(), cookie
        value = cookie.split(";")[0].split("=", 1)[1]
        assert value and TOKEN not in value  # the cookie is derived from the token, not the token

        page = browser.get("/")  # httpx keeps the cookie, as a browser does
        assert page.status_code == 200 and 'src="/static/editor.js"' in page.text
        assert TOKEN not in page.text and value not in page.text
        assert browser.get("/api/v1/system").status_code == 200  # the page's API calls ride on the cookie
    with _plain(url) as other:
        assert other.get("/api/v1/system").status_code == 401
        forged = other.get("/api/v1/system", headers={"Cookie": f"{cookie_name}={TOKEN}"})
        assert forged.status_code == 401  # the token itself is not a session
        other_port = other.get("/api/v1/system", headers={"Cookie": f"threedis-session-1={value}"})
        assert other_port.status_code == 401
        form = other.post("/login", data={"token": TOKEN})
        assert form.status_code == 303 and form.headers["set-cookie"].startswith(f"{cookie_name}=")
        assert other.post("/login", data={"token": "nope"}).status_code == 401


def test_the_editor_page_is_served_only_by_the_route_that_checks_the_session(service):
    url, _ = service
    with _plain(url) as client:
        assert client.get("/static/editor.js").status_code == 200  # its scripts and styles carry no secret
        client.get("/", params={"token": TOKEN})  # signed in: still not under /static
        for path in ("/static/index.html", "/static/signin.html", "/static/INDEX.HTML", "/static/./index.html"):
            answer = client.get(path)
            assert answer.status_code == 404 and "editor.js" not in answer.text, path


def test_the_editor_cannot_be_framed_and_runs_only_its_own_scripts(service):
    url, _ = service
    with _plain(url) as client:
        answers = [client.get("/"), client.get("/static/editor.js"), client.get("/api/v1/system"),
                   client.get("/", params={"token": TOKEN}), client.get("/")]
    for answer in answers:
        headers = answer.headers
        assert headers["x-frame-options"] == "DENY", answer.url
        assert headers["x-content-type-options"] == "nosniff", answer.url
        csp = headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp, csp
        assert "unsafe-inline" not in csp.split("script-src")[1].split(";")[0], csp
    page = answers[-1].text
    assert not re.search(r"<script(?![^>]*\bsrc=)", page), "an inline script would be blocked by the CSP"
    with _plain(url) as client:
        docs = client.get("/docs")
    assert docs.status_code == 200 and docs.headers["x-frame-options"] == "DENY"
    assert re.search(r"script-src 'self' 'sha256-[A-Za-z0-9+/=]+'", docs.headers["content-security-policy"])


# ---------------------------------------------------------------------------- the WebSocket


def _session_cookie(url: str) -> str:
    with _plain(url) as client:
        return client.get("/", params={"token": TOKEN}).headers["set-cookie"].split(";")[0]


def test_websocket_takes_the_header_the_cookie_or_a_first_message(service):
    url, _ = service
    for log in (EventLog(url, TOKEN, how="header"), EventLog(url, TOKEN, how="message"),
                EventLog(url, None, headers={"Cookie": _session_cookie(url)})):
        try:
            assert log.wait_for(lambda e: e["type"] == "snapshot", timeout=30)["jobs"] == []
        finally:
            log.close()


def test_websocket_refusals_use_the_http_status_rule(service):
    from websockets.exceptions import ConnectionClosedError, InvalidStatus
    from websockets.sync.client import connect

    url, _ = service
    ws_url = url.replace("http://", "ws://") + "/api/v1/events"
    cases = [({"Authorization": "Bearer wrong"}, "", None, 401), ({}, f"?token={TOKEN}", None, 401),
             ({"Authorization": f"Bearer {TOKEN}"}, "", "http://evil.example", 403)]
    for headers, query, origin, status in cases:
        with pytest.raises(InvalidStatus) as err:
            connect(ws_url + query, additional_headers=headers, origin=origin, open_timeout=30)
        assert err.value.response.status_code == status, (headers, query, origin)
        body = json.loads(err.value.response.body)
        assert body["detail"]["message"]
    with connect(ws_url, open_timeout=30) as ws:  # no credentials: the first message must be the token
        ws.send(json.dumps({"type": "auth", "token": "wrong"}))
        with pytest.raises(ConnectionClosedError) as closed:
            ws.recv(timeout=30)
    assert closed.value.rcvd.code == 4401 and "token" in closed.value.rcvd.reason


def test_no_token_reaches_a_log_line(service):
    from threedis.engine.serve.security import redact

    url, _ = service
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    keep = Keep()
    loggers = [logging.getLogger(name) for name in ("uvicorn.access", "uvicorn.error")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(keep)
        logger.setLevel(logging.INFO)
    try:
        with _plain(url) as client:
            client.get("/", params={"token": TOKEN})
            client.get("/api/v1/system", params={"token": TOKEN})
            encoded = client.get(f"/?%74oken={TOKEN}")  # Starlette decodes the name: it signs in...
            assert encoded.status_code == 303, encoded.text  # ...so its log line must not carry it either
            client.get(f"/static/{TOKEN}.js")  # a token anywhere in a URL
        from websockets.exceptions import InvalidStatus

        with pytest.raises(InvalidStatus):
            EventLog(url, TOKEN, how="query")
        log = EventLog(url, TOKEN, how="message")
        log.wait_for(lambda e: e["type"] == "snapshot", timeout=30)
        log.close()
    finally:
        for logger, level in zip(loggers, levels):
            logger.removeHandler(keep)
            logger.setLevel(level)
    text = "\n".join(seen)
    assert "token=***" in text, text  # the requests were logged...
    assert TOKEN not in text  # ...without the secret
    assert redact("GET /?token=abc&x=1 and /events?TOKEN=def") == "GET /?token=***&x=1 and /events?TOKEN=***"
    assert redact("GET /?x=1&%74oken=abc&y=2 /?T%4Fken=d") == "GET /?x=1&%74oken=***&y=2 /?T%4Fken=***"
    assert redact("/a/s3cret/b s3%2Fcret", frozenset({"s3/cret", "s3cret"})) == "/a/***/b ***"


# ---------------------------------------------------------------------------- status codes


def test_an_oversized_chunked_body_gets_413_and_a_nesting_bomb_422(service):
    url, config = service

    def chunks():
        for _ in range(8):
            yield b" " * (config.max_json_bytes // 4)

    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as client:
        chunked = client.post("/api/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"})
        assert chunked.status_code == 413 and "too large" in chunked.json()["detail"]["message"]
        bomb = client.post("/api/v1/jobs", content=b"[" * 3000 + b"]" * 3000,
                           headers={"Content-Type": "application/json"})
        assert bomb.status_code == 422 and "nested" in bomb.json()["detail"]["message"], bomb.text
        plan_bomb = client.post("/api/v1/plan", content=b'{"layout": ' + b"[" * 3000 + b"]" * 3000 + b"}")
        assert plan_bomb.status_code == 422
        nan = client.post("/api/v1/jobs", content=b'{"layout": {}, "options": {"seed": NaN}}')
        assert nan.status_code == 422 and "NaN" in nan.json()["detail"]["message"]
        for body, words in ((b'{"layout": {}, "options": {"seed": ' + b"9" * 5000 + b"}}", "5000 digits"),
                            (b'{"layout": {}, "layout": {}}', "appears twice")):  # read as a layout file is
            strict = client.post("/api/v1/jobs", content=body)
            assert strict.status_code == 422 and words in strict.json()["detail"]["message"], strict.text
        failed = client.get("/api/v1/system").json()
        assert failed["state"] == "failed" and failed["error"] == "no engine in this test"
        layout = {"prompt": "p", "width": 64, "height": 64, "instances": []}
        refused = client.post("/api/v1/jobs", json={"layout": layout, "options": {"steps": 1}})
        assert refused.status_code == 503 and "did not load" in refused.json()["detail"]["message"]


# ---------------------------------------------------------------------------- one service per folder


def test_a_second_service_on_the_same_folder_is_refused_and_says_who_holds_it(service):
    import os

    from threedis import UserError
    from threedis.engine.serve.app import create_app

    _, config = service
    with pytest.raises(UserError, match=rf"in use by threedis serve at http://127.0.0.1:{config.port}/ "
                                        rf"\(pid {os.getpid()} on "):
        create_app(_config(config.out), engine_factory=_no_engine)
    history = config.out / "history.sqlite3"
    assert history.is_file()  # and the running service's history was not touched by the refused one
    from threedis.engine.locks import folder_lock

    with pytest.raises(UserError, match="in use by threedis serve"):  # the project's one folder lock: batch too
        with folder_lock(config.out, "threedis batch"):
            pass


def test_the_lock_goes_with_its_service(tmp_path):
    out = tmp_path / "out"
    with running_service(_config(out), engine_factory=_no_engine):
        pass
    with running_service(_config(out), engine_factory=_no_engine):  # the first one stopped: free again
        pass


# ---------------------------------------------------------------------------- the command's checks

PROBE = """
import contextlib, io, json, sys
from threedis.engine.cli import main
err = io.StringIO()
with contextlib.redirect_stderr(err):
    code = main(sys.argv[1:])
heavy = ("torch", "fastapi", "uvicorn", "diffusers")
print(json.dumps({"code": code, "loaded": [m for m in heavy if m in sys.modules], "err": err.getvalue()}))
"""


def test_a_busy_port_is_one_line_before_anything_heavy_loads(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        done = subprocess.run([sys.executable, "-c", PROBE, "serve", "--port", str(port), "--out", str(tmp_path)],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["code"] == 2 and result["loaded"] == [], result
    err = result["err"].strip()
    assert err.startswith(f"threedis: error: --port {port}: the port is already in use") and "\n" not in err


@pytest.mark.parametrize("argv, words", [
    (["--host", "203.0.113.7"], "--host 203.0.113.7: not an address of this machine"),
    (["--max-upload-mb", "nan"], "--max-upload-mb must be a positive number, got nan"),
    (["--max-upload-mb", "inf"], "--max-upload-mb must be a positive number"),
    (["--max-lora-mb", "-1"], "--max-lora-mb must be a positive number"),
    (["--lora-dir", "/no/such/folder"], "--lora-dir /no/such/folder: not a folder"),
])
def test_bad_settings_are_one_line(argv, words, tmp_path, capsys):
    from threedis.engine import cli

    assert cli.main(["serve", "--out", str(tmp_path), "--port", str(free_port()), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("threedis: error: ") and words in err and "\n" not in err, err


def test_a_broken_token_file_is_replaced_and_a_folder_there_is_one_line(tmp_path, monkeypatch, capsys):
    from threedis.engine import cli
    from threedis.engine.serve.security import load_or_create_token, token_path

    monkeypatch.setenv("THREEDIS_CACHE", str(tmp_path / "cache"))
    path = token_path(tmp_path / "cache")
    path.parent.mkdir(parents=True)
    with socket.socket() as busy:  # the command stops at the port, after reading the token
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = str(busy.getsockname()[1])
        path.write_bytes(b"\xff\xfe not utf-8 \x00")
        assert cli.main(["serve", "--out", str(tmp_path / "out"), "--port", port]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[0] == f"threedis: warning: the token file {path} is not UTF-8 text; replacing it with a new token"
        assert err[1].startswith("threedis: error: --port") and len(err) == 2
        fresh = path.read_text(encoding="utf-8").strip()
        assert len(fresh) >= 32 and load_or_create_token(tmp_path / "cache") == fresh
        path.unlink()
        path.mkdir()
        assert cli.main(["serve", "--out", str(tmp_path / "out"), "--port", port]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"threedis: error: the token file {path} is a folder; remove it (a new token is then made) or "
                   f"set THREEDIS_CACHE to another folder")


def test_a_model_that_does_not_load_ends_the_service_in_one_line(tmp_path, capsys):
    from threedis.engine import cli

    port = free_port()
    code = cli.main(["serve", "--model", str(tmp_path / "no-such-model"), "--port", str(port),
                     "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 2, captured
    assert f"http://127.0.0.1:{port}/?token=" in captured.out  # it answered first, while loading
    err = captured.err.strip().splitlines()
    assert err[-1].startswith("threedis: error: ") and "no-such-model" in err[-1], captured.err
