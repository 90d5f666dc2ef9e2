"""Serve the Flask (WSGI) app from an asyncio server without giving slow clients a thread.
Layer L3.

gunicorn's gthread worker hands a connection to one of its threads as soon as a byte
arrives, and the thread then blocks reading the rest: 24 clients that send one byte each held
all 24 threads, and `/health` (Label Studio waits 1 s) timed out until they went away. Here the
event loop of gunicorn's asyncio worker (`backend.http_worker`) reads every request, its head
and its WHOLE body, and only a complete request reaches a thread:

- before a byte of the body is read, `RequestRules` decides from the head alone: credentials
  (401) and the route's body limit against Content-Length (413);
- the body is read within the route's limit (a chunked body that passes it is a 413, never
  cut), within `BODY_SECONDS` (408), and its bytes come out of the memory budget while the
  request lasts (503 when others hold it);
- the WSGI app then runs on a bounded thread pool of gunicorn's ``threads``; `/health` has a
  small pool of its own, so it never waits behind predictions or anything else (asgiref's
  WsgiToAsgi runs every request on ONE thread by default, which would put `/health` behind
  a 100 s `/predict`).

Answers are collected whole in the thread (every route answers a JSON document) and written
by the event loop.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sys
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import unquote_to_bytes

from backend.app import AUTH_REALM, RETRY_AFTER_SECONDS, RequestRules

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
StartResponse = Callable[..., Callable[[bytes], object]]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

#: How long a request body may take to arrive, in all (Label Studio sends 64 MiB on loopback in
#: well under a second).
BODY_SECONDS = 60.0
#: Paths served by a pool of their own, never queued behind other requests.
QUICK_PATHS = frozenset({"/health"})
QUICK_THREADS = 2


class RefusalError(Exception):
    """A request answered before it reaches the app (status, message, extra headers)."""

    def __init__(self, status: int, message: str, headers: tuple[tuple[str, str], ...] = ()):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


class WsgiBridge:
    """An ASGI app that serves `app` (WSGI) as the module docstring says.

    `threads` bounds the WSGI calls running at once (plus `QUICK_THREADS` for `/health`);
    requests beyond them wait on the event loop, costing no thread.
    """

    def __init__(
        self,
        app: WSGIApp,
        rules: RequestRules,
        *,
        threads: int,
        multiprocess: bool = False,
        body_seconds: float = BODY_SECONDS,
    ) -> None:
        if threads < 1:
            raise ValueError("the bridge needs at least one thread")
        self.app = app
        self.rules = rules
        self.body_seconds = body_seconds
        self.multiprocess = multiprocess
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="wsgi")
        self._quick = ThreadPoolExecutor(QUICK_THREADS, thread_name_prefix="wsgi-health")

    def close(self) -> None:
        """Stop taking work; calls already running finish."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._quick.shutdown(wait=False, cancel_futures=True)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)
        # Anything else (a websocket) is not served: returning refuses it.

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = _path_info(scope)
        headers = _headers(scope)
        taken = 0
        try:
            refused = self.rules.refusal(path, headers.get("authorization"))
            if refused is not None:
                status, message = refused
                realm = ("WWW-Authenticate", f'Basic realm="{AUTH_REALM}"')
                raise RefusalError(status, message, (realm,) if status == 401 else ())
            body, taken = await self._body(path, headers, receive)
            environ = self._environ(scope, path, headers, body)
            pool = self._quick if path in QUICK_PATHS else self._pool
            loop = asyncio.get_running_loop()
            status_line, response_headers, content = await loop.run_in_executor(
                pool, _call_wsgi, self.app, environ
            )
        except RefusalError as refusal:
            await _answer_error(send, refusal)
            return
        except _ClientGoneError:
            return
        finally:
            self.rules.budget.give(taken)
        await send(
            {
                "type": "http.response.start",
                "status": int(status_line.split(" ", 1)[0]),
                "headers": [
                    (name.lower().encode("latin-1"), value.encode("latin-1"))
                    for name, value in response_headers
                ],
            }
        )
        await send({"type": "http.response.body", "body": content, "more_body": False})

    async def _body(
        self, path: str, headers: dict[str, str], receive: Receive
    ) -> tuple[io.BytesIO, int]:
        """The whole body within the route's limit, and the budget bytes it took (which the
        caller gives back)."""
        limit = self.rules.body_limit(path)
        budget = self.rules.budget
        too_large = RefusalError(413, self.rules.limits.too_large(path))
        busy = RefusalError(
            503,
            "the backend is reading other large requests (WAFER_REQUEST_MEMORY_MB); ask again "
            f"in {RETRY_AFTER_SECONDS} s",
            (("Retry-After", str(RETRY_AFTER_SECONDS)),),
        )
        length = _content_length(headers)
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        buffer = io.BytesIO()
        if length is None and not chunked:
            return buffer, 0  # no body (gunicorn refuses other framings)
        if length is not None and length > limit:
            raise too_large
        taken = 0
        if length is not None:
            if not budget.take(length):
                raise busy
            taken = length
        try:
            async with asyncio.timeout(self.body_seconds):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise _ClientGoneError()
                    chunk = message.get("body", b"")
                    if chunk:
                        if buffer.tell() + len(chunk) > limit:
                            raise too_large
                        if length is None:
                            if not budget.take(len(chunk)):
                                raise busy
                            taken += len(chunk)
                        buffer.write(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            budget.give(taken)
            raise RefusalError(
                408, f"the request body did not arrive within {self.body_seconds:.0f} s"
            ) from None
        except BaseException:
            budget.give(taken)
            raise
        buffer.seek(0)
        return buffer, taken

    def _environ(
        self, scope: Scope, path: str, headers: dict[str, str], body: io.BytesIO
    ) -> dict[str, Any]:
        server = scope.get("server") or ("localhost", 80)
        client = scope.get("client")
        environ: dict[str, Any] = {
            "REQUEST_METHOD": scope["method"],
            "SCRIPT_NAME": scope.get("root_path", ""),
            "PATH_INFO": path,
            "QUERY_STRING": scope.get("query_string", b"").decode("latin-1"),
            "SERVER_NAME": str(server[0]),
            "SERVER_PORT": str(server[1]) if server[1] is not None else "80",
            "SERVER_PROTOCOL": f"HTTP/{scope.get('http_version', '1.1')}",
            "REMOTE_ADDR": client[0] if client else "",
            "REMOTE_PORT": str(client[1]) if client else "",
            "CONTENT_LENGTH": str(len(body.getbuffer())),
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": scope.get("scheme", "http"),
            "wsgi.input": body,
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": self.multiprocess,
            "wsgi.run_once": False,
            "wsgi.input_terminated": True,
        }
        for name, value in headers.items():
            if name == "content-type":
                environ["CONTENT_TYPE"] = value
            elif name not in ("content-length", "transfer-encoding"):
                environ["HTTP_" + name.upper().replace("-", "_")] = value
        return environ


class _ClientGoneError(Exception):
    """The client went away before its request was complete: nothing to answer."""


def _path_info(scope: Scope) -> str:
    """PATH_INFO as WSGI wants it: the percent-decoded path's bytes as latin-1 text."""
    raw = scope.get("raw_path") or scope["path"].encode("utf-8")
    path = unquote_to_bytes(raw.split(b"?", 1)[0]).decode("latin-1")
    root = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def _headers(scope: Scope) -> dict[str, str]:
    """Lower-case header names to their values (repeated ones joined with ", "). Names with
    an underscore are dropped: in WSGI they would pass for the dashed name."""
    found: dict[str, str] = {}
    for raw_name, raw_value in scope.get("headers", []):
        name = raw_name.decode("latin-1").lower()
        if "_" in name:
            continue
        value = raw_value.decode("latin-1")
        found[name] = f"{found[name]}, {value}" if name in found else value
    return found


def _content_length(headers: dict[str, str]) -> int | None:
    text = headers.get("content-length")
    if text is None:
        return None
    if not text.isascii() or not text.isdigit():
        raise RefusalError(400, "Content-Length must be a number of bytes")
    return int(text)


def _call_wsgi(app: WSGIApp, environ: dict[str, Any]) -> tuple[str, list[tuple[str, str]], bytes]:
    """Run the WSGI app in this (pool) thread: its status line, headers and whole body."""
    started: list[tuple[str, list[tuple[str, str]]]] = []
    written: list[bytes] = []

    def start_response(
        status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], object]:
        if exc_info is not None and started:
            raise exc_info[1].with_traceback(exc_info[2])
        started[:] = [(status, headers)]
        return written.append

    try:
        result = app(environ, start_response)
        try:
            written.extend(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
    except Exception:
        log.exception("%s %s failed", environ["REQUEST_METHOD"], environ["PATH_INFO"])
        message = json.dumps({"error": "the request failed inside the server"}).encode()
        return "500 Internal Server Error", [("Content-Type", "application/json")], message
    if not started:
        message = json.dumps({"error": "the app gave no answer"}).encode()
        return "500 Internal Server Error", [("Content-Type", "application/json")], message
    status, headers = started[0]
    return status, headers, b"".join(written)


async def _answer_error(send: Send, refusal: RefusalError) -> None:
    body = json.dumps({"error": refusal.message}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((name.lower().encode(), value.encode()) for name, value in refusal.headers),
    ]
    await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
