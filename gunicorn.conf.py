"""gunicorn's settings for the wafer-map backend; gunicorn reads this file from the directory it
starts in (the checkout, /app in the Docker image) whatever the command line says.

Defaults (command-line flags override them): 127.0.0.1:9090, one worker process, 300 s worker
timeout, no control socket. The worker (`backend.http_worker.BackendWorker`) is gunicorn 27's
asyncio worker: its event loop reads every request, head and whole body, so slow or silent
clients hold no thread, and 24 threads run the Flask app on complete requests only (gthread
gave a thread to every connection that sent a byte: 24 silent clients blocked /health).
gunicorn's control socket is off: its default path ($XDG_RUNTIME_DIR/gunicorn.ctl or
~/.gunicorn/gunicorn.ctl) is shared by every instance a user starts, so a later instance took it
over and an earlier one's shutdown deleted it. Checked before the server starts:

- without BASIC_AUTH_USER/BASIC_AUTH_PASS the backend binds loopback addresses only (a
  ``--bind 0.0.0.0:9090`` is refused with a message saying what to set);
- the threads must outnumber WAFER_PREDICT_REQUESTS (20), so that webhooks and the other
  routes always find a free thread while predictions run or wait (/health has two of its own).
"""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path
from typing import Any

CHECKOUT = str(Path(__file__).resolve().parent)
if CHECKOUT not in sys.path:
    sys.path.insert(0, CHECKOUT)  # the worker class and settings come from the checkout

bind = ["127.0.0.1:9090"]
workers = 1
worker_class = "backend.http_worker.BackendWorker"
threads = 24
timeout = 300
control_socket_disable = True


def _loopback(address: str) -> bool:
    if address.startswith("unix:"):
        return True
    host = address.rsplit(":", 1)[0].strip("[]") if ":" in address else address
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: may resolve to anything


def on_starting(server: Any) -> None:
    """Refuse an open backend on a non-loopback address, and too few threads."""
    from backend.settings import Settings  # the checkout's settings, read once here

    settings = Settings.from_env(os.environ)
    open_to = [a for a in server.cfg.bind if not _loopback(a)]
    if settings.basic_auth is None and open_to:
        raise SystemExit(
            f"refusing to serve {', '.join(open_to)} without credentials: set BASIC_AUTH_USER "
            "and BASIC_AUTH_PASS, or bind 127.0.0.1 only"
        )
    if server.cfg.threads <= settings.predict_requests:
        raise SystemExit(
            f"gunicorn --threads {server.cfg.threads} must be more than WAFER_PREDICT_REQUESTS "
            f"({settings.predict_requests}), or /health waits behind predictions"
        )
    if settings.basic_auth is None:
        server.log.warning(
            "NO AUTHENTICATION: the backend is open to every process on this host "
            "(set BASIC_AUTH_USER and BASIC_AUTH_PASS to protect it)"
        )
