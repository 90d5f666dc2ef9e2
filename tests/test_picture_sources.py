"""Where a task's picture may point, and what of it reaches a log (issue 15, rows 9 and 11).

Row 9: a picture value with a line break (or any control character) forged a backend log line,
and the worker stored it in task data. Every message about a task's picture now shows control
characters escaped. Row 11: the picture-path check ran on the decoded path, so
``/data/upload/%2e%2e/%2e%2e/api/projects/`` passed and went to Label Studio with its token;
encoded dot segments and backslashes are now refused on the raw path, before any decoding.
"""

from __future__ import annotations

import functools
import logging
import posixpath
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import numpy as np
import pytest

from backend.encoding import render_picture
from backend.image_client import image_client
from backend.images import ImageError, ImageRules, fetch_image, model_input, png_bytes
from backend.label_config import LabelConfig
from backend.predictions import read_pictures

LS = "http://ls.example:8080"
TOKEN = "0123456789abcdef0123456789abcdef01234567"
PNG = png_bytes(render_picture(np.ones((20, 20), np.uint8)))
CONTROLS = ("\n", "\r", "\x1b", "\x00", "\x85", "\u2028", "\u2029", "\u202e")


def fake_client() -> tuple[httpx.Client, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=PNG)

    return httpx.Client(transport=httpx.MockTransport(answer)), seen


# ---- row 9: control characters never reach a log line ---------------------------------------


FORGED = "\n2026-12-04 10:00:00 INFO backend.service: predict for project 1: all good"


@pytest.mark.parametrize(
    "value",
    [
        "http://pictures.example/w.png" + FORGED,
        "/data/upload/1/w.png\r" + FORGED,
        "http://pictures.example/\x1b[2Jw.png",
        "http://pictures.example:x/\u2028w.png\u202e",
        "https://evil.example/\x85w.png",
        "ftp://pictures.example/w.png" + FORGED,
        "/api/projects/1" + FORGED,
    ],
)
def test_a_picture_value_cannot_forge_a_log_line(
    value: str, label_config: LabelConfig, caplog: pytest.LogCaptureFixture
) -> None:
    """The table's row 9, through the reader the backend and the worker use and the log line
    the service writes about a batch's failures (`failure_summary`: its errors joined)."""
    client, _ = fake_client()
    fetch = functools.partial(
        model_input,
        client=client,
        label_studio_url=LS,
        api_key=TOKEN,
        size=16,
        rules=ImageRules(allowed_hosts=("pictures.example",)),
    )
    with pytest.raises(ImageError) as caught:
        fetch(value)
    tasks = [{"id": 7, "data": {label_config.image_value: value}}]
    classifier = _FakeClassifier(label_config)
    (failed,) = read_pictures(tasks, classifier, label_config, fetch)  # type: ignore[arg-type]
    error = getattr(failed, "error", None)
    assert isinstance(error, str) and error.startswith("task 7: ")
    log = logging.getLogger("backend.service")
    with caplog.at_level(logging.INFO, logger="backend.service"):
        log.warning("predict for project %d: %s", 1, error)
        log.warning("task %s: %s", 7, caught.value)
    for text in (str(caught.value), error, *(r.getMessage() for r in caplog.records)):
        assert not any(c in text for c in CONTROLS), repr(text)
    assert len(caplog.records) == 2 and len(caplog.text.splitlines()) == 2


def test_any_reader_error_is_escaped_in_the_prediction(label_config: LabelConfig) -> None:
    """Not only `ImageError`s: whatever ValueError a reader raises, its message is escaped."""

    def fetch(value: str) -> Any:
        raise ValueError(f"cannot read {value}")

    tasks = [{"id": 3, "data": {label_config.image_value: "x\nINFO forged\x1b[31m"}}]
    (failed,) = read_pictures(tasks, _FakeClassifier(label_config), label_config, fetch)  # type: ignore[arg-type]
    assert getattr(failed, "error", None) == "task 3: cannot read x\\nINFO forged\\x1b[31m"


class _FakeClassifier:
    """Only what `read_pictures` asks of a classifier: the image size of its card."""

    def __init__(self, label_config: LabelConfig) -> None:
        self.card = type("Card", (), {"image_size": 16})()


# ---- row 11: the path check sees what the server will see -------------------------------------

TRAVERSALS = [
    "/data/upload/%2e%2e/%2e%2e/api/projects/",
    "/data/upload/%2E%2e/%2e%2E/api/projects/1",
    "/data/upload/.%2e/%2e./api/projects/1",
    "/data/upload/%252e%252e/%252e%252e/api/projects/1",
    "/data/upload/%25252e%25252e/%25252e%25252e/api/projects/1",
    "/data/upload/..%2f..%2fapi/projects/1",
    "/data/upload/..%2F..%2Fapi/projects/1",
    "/data/upload\\..\\..\\api\\projects\\1",
    "/data/upload/%5c..%5c..%5capi/projects/1",
    "/data/upload/1/%2e/w.png",
    "/data/upload/1/w.png%00.png",
    f"{LS}/data/upload/%2e%2e/%2e%2e/api/projects/",
    "/tasks/1/resolve/%2e%2e/%2e%2e/%2e%2e/api/projects/1",
]


@pytest.mark.parametrize("value", TRAVERSALS)
def test_encoded_dot_segments_and_backslashes_are_refused_before_any_request(value: str) -> None:
    client, seen = fake_client()
    with pytest.raises(ImageError, match=r"dot segment|backslash|control character|encoded"):
        fetch_image(value, client, label_studio_url=LS, api_key=TOKEN)
    assert seen == []


def test_a_redirect_to_an_encoded_traversal_is_refused() -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/tasks/1/resolve/":
            return httpx.Response(302, headers={"Location": "/data/upload/%2e%2e/%2e%2e/api/x"})
        return httpx.Response(200, content=PNG)

    client = httpx.Client(transport=httpx.MockTransport(answer))
    with pytest.raises(ImageError, match="dot segment"):
        fetch_image("/tasks/1/resolve/?fileuri=czM6", client, label_studio_url=LS, api_key=TOKEN)
    assert [r.url.path for r in seen] == ["/tasks/1/resolve/"]


@pytest.mark.parametrize(
    "value",
    [
        "/data/upload/3/a%20b.png",
        "/data/upload/3/wafer..png",
        "/data/upload/3/..wafer.png",
        "/data/upload/3/%E2%80%A6.png",
        "/data/upload/3/100%25.png",
        "/data/local-files/?d=wafers/../set3/w1.png",
        "/data/local-files/?d=wafers%5cset3%2ew1.png",
    ],
)
def test_ordinary_picture_paths_still_pass(value: str) -> None:
    client, seen = fake_client()
    assert fetch_image(value, client, label_studio_url=LS, api_key=TOKEN) == PNG
    assert len(seen) == 1 and seen[0].headers["Authorization"] == f"Token {TOKEN}"


@contextmanager
def normalising_server() -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """A stand-in for Label Studio behind a proxy that decodes and normalises paths: it serves
    its API at /api/projects/ to anyone with the token."""
    hits: list[tuple[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            for _ in range(3):
                path = urllib.parse.unquote(path)
            path = posixpath.normpath(path.replace("\\", "/"))
            hits.append((path, self.headers.get("Authorization", "")))
            body = b'{"projects": "SECRET"}' if path.startswith("/api/") else PNG
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits
    finally:
        server.shutdown()
        server.server_close()


def test_the_api_is_never_reached_through_an_encoded_picture_path() -> None:
    """The table's row 11 with a loopback stand-in: before, the request reached the API path
    with the token (and its answer was only refused as 'not a picture')."""
    with normalising_server() as (url, hits):
        for client in (image_client(url), httpx.Client(timeout=5.0)):
            fetch = functools.partial(
                fetch_image, client=client, label_studio_url=url, api_key=TOKEN
            )
            assert fetch("/data/upload/1/w.png") == PNG
            for value in TRAVERSALS[:9]:
                with pytest.raises(ImageError):
                    fetch(value)
    assert [path for path, _ in hits] == ["/data/upload/1/w.png"] * 2
    assert not any(path.startswith("/api") for path, _ in hits)
