"""The gunicorn worker that serves the backend: gunicorn 27's asyncio (ASGI) worker reading
every request, and `backend.wsgi_bridge` running the Flask app on a bounded thread pool.
Layer L3.

gunicorn.conf.py names it (``worker_class``); `gunicorn _wsgi:app` loads the Flask app as
before and this worker wraps it. gunicorn's ``threads`` setting keeps its meaning: the threads
that run the app (the asyncio worker itself uses none). A connection that has not sent a whole
request head within `REQUEST_HEAD_SECONDS` is answered 408 and closed (gunicorn's asyncio worker
waits for a first request for as long as the client keeps the connection; later requests on a
kept-alive connection have gunicorn's ``keepalive`` seconds). Any WSGI app can be served this
way; one `backend.app.create_app` made brings its own `RequestRules` (credentials, body
limits, memory budget), any other gets the defaults.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from gunicorn.asgi.protocol import ASGIProtocol
from gunicorn.workers.gasgi import ASGIWorker

from backend.app import RequestRules, request_rules
from backend.wsgi_bridge import WsgiBridge

#: Seconds a new connection has to send its first request head.
REQUEST_HEAD_SECONDS = 10.0


class HeadDeadlineProtocol(ASGIProtocol):
    """gunicorn's HTTP/1 protocol with a deadline for the first request head."""

    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._head_timer = self.worker.loop.call_later(REQUEST_HEAD_SECONDS, self._head_too_slow)

    def _on_headers_complete(self) -> Any:
        self._cancel_head_timer()
        return super()._on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self._closed or self._current_request is not None or self.reader is not None:
            return  # gone, or a head came, or not HTTP/1 (HTTP/2 and uWSGI use the reader)
        self._send_error_response(
            408, f"no complete request head within {REQUEST_HEAD_SECONDS:.0f} s\n"
        )
        self._close_transport()
        ready = getattr(self, "_request_ready", None)
        if ready is not None:
            ready.set()  # the connection's task sees it closed and ends


class BackendWorker(ASGIWorker):
    """gunicorn's ASGI worker serving a WSGI app through `WsgiBridge` (see the module)."""

    bridge: WsgiBridge | None = None
    asgi: Any  # what gunicorn loaded, then the bridge around it

    @classmethod
    def check_config(cls, cfg: Any, log: Any) -> None:
        """``threads`` is used here (the bridge's pool): no warning that it is not."""

    def load_wsgi(self) -> None:
        super().load_wsgi()  # gunicorn loads `_wsgi:app` into self.asgi
        app = self.asgi
        self.bridge = WsgiBridge(
            app,
            request_rules(app) or RequestRules(),
            threads=self.cfg.threads,
            multiprocess=self.cfg.workers > 1,
        )
        self.asgi = self.bridge

    async def _serve(self) -> None:
        """gunicorn's serving loop with `HeadDeadlineProtocol` (and no lifespan: the bridge
        needs none)."""
        ssl_context = self._get_ssl_context()
        for sock in self.sockets:
            server = await self.loop.create_server(
                lambda: HeadDeadlineProtocol(self),
                sock=sock.sock,
                ssl=ssl_context,
                reuse_address=True,
                start_serving=True,
            )
            self.servers.append(server)
            self.log.info("listening on %s", sock)
        try:
            while self.alive:
                self.notify()
                if self.ppid != os.getppid():
                    self.log.info("Parent changed, shutting down: %s", self)
                    break
                await asyncio.sleep(1.0)
        except asyncio.CancelledError:
            pass
        await self._shutdown()
        if self.bridge is not None:
            self.bridge.close()
