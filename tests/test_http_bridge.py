"""`WsgiBridge` in-process: the ASGI side driven by hand (no sockets), so each rule of the
bridge is seen on its own: what is refused before the body is read, how bodies are read and
bounded, the lane of /health, the WSGI environ the app gets."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterable, MutableMapping
from typing import Any

import pytest

from backend.app import MemoryBudget, RequestLimits, RequestRules, create_app
from backend.wsgi_bridge import WsgiBridge
from tests.test_app import PASSWORD, PREDICT_BODY, USER, FakeBackend, as_backend, basic

Message = MutableMapping[str, Any]


def scope(
    method: str, path: str, headers: dict[str, str] | None = None, query: bytes = b""
) -> dict[str, Any]:
    return {
        "type": "http",
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        "server": ("127.0.0.1", 9090),
        "client": ("127.0.0.1", 50000),
    }


class Exchange:
    """One request's receive and send: `chunks` are the body's pieces (a None waits forever);
    `disconnect` ends the body with the client gone."""

    def __init__(self, chunks: Iterable[bytes | None] = (), disconnect: bool = False) -> None:
        self.chunks = list(chunks)
        self.disconnect = disconnect
        self.received = 0
        self.sent: list[Message] = []

    async def receive(self) -> Message:
        self.received += 1
        if not self.chunks:
            if self.disconnect:
                return {"type": "http.disconnect"}
            return {"type": "http.request", "body": b"", "more_body": False}
        chunk = self.chunks.pop(0)
        if chunk is None:
            await asyncio.Event().wait()  # a client that never sends the rest
        more = bool(self.chunks) or self.disconnect
        return {"type": "http.request", "body": chunk, "more_body": more}

    async def send(self, message: Message) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int | None:
        starts = [m for m in self.sent if m["type"] == "http.response.start"]
        return starts[0]["status"] if starts else None

    @property
    def headers(self) -> dict[str, str]:
        [start] = [m for m in self.sent if m["type"] == "http.response.start"]
        return {k.decode(): v.decode() for k, v in start["headers"]}

    def json(self) -> Any:
        return json.loads(b"".join(m.get("body", b"") for m in self.sent[1:]))


def run(bridge: WsgiBridge, request: dict[str, Any], exchange: Exchange) -> Exchange:
    asyncio.run(bridge(request, exchange.receive, exchange.send))
    return exchange


def echo_app(seen: list[dict[str, Any]]) -> Callable[..., Iterable[bytes]]:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        body = environ["wsgi.input"].read()
        seen.append({**environ, "body": body})
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps({"length": len(body)}).encode()]

    return app


@pytest.fixture
def fake() -> FakeBackend:
    return FakeBackend()


def locked_bridge(fake: FakeBackend, **limits: int) -> WsgiBridge:
    app = create_app(as_backend(fake), basic_auth=(USER, PASSWORD), limits=RequestLimits(**limits))
    rules = app.extensions["wafermap.request_rules"]
    return WsgiBridge(app, rules, threads=2)


def test_the_app_gets_a_whole_request(fake: FakeBackend) -> None:
    seen: list[dict[str, Any]] = []
    bridge = WsgiBridge(echo_app(seen), RequestRules(), threads=1)
    headers = {"Content-Length": "10", "Content-Type": "application/json", "X-Fab": "f1",
               "X_Forged": "no", "Authorization": "Basic eA=="}  # fmt: skip
    request = scope("POST", "/predict%2Fx", headers, query=b"project=2&a=%20")
    answer = run(bridge, request, Exchange([b'{"a":', b" 123}"]))
    assert answer.status == 200 and answer.json() == {"length": 10}
    [environ] = seen
    assert environ["body"] == b'{"a": 123}' and environ["CONTENT_LENGTH"] == "10"
    assert environ["PATH_INFO"] == "/predict/x"
    assert environ["QUERY_STRING"] == "project=2&a=%20"
    assert environ["CONTENT_TYPE"] == "application/json"
    assert environ["HTTP_X_FAB"] == "f1" and "HTTP_X_FORGED" not in environ
    assert environ["HTTP_AUTHORIZATION"] == "Basic eA=="
    assert environ["wsgi.input_terminated"] and environ["wsgi.multithread"]
    assert environ["REMOTE_ADDR"] == "127.0.0.1" and environ["SERVER_PORT"] == "9090"


def test_unauthenticated_bodies_are_not_read(fake: FakeBackend) -> None:
    bridge = locked_bridge(fake)
    headers = {"Content-Length": str(2**20)}
    exchange = run(bridge, scope("POST", "/predict", headers), Exchange([None]))
    assert exchange.status == 401 and exchange.received == 0
    assert exchange.headers["www-authenticate"].startswith("Basic")
    assert fake.calls == []
    health = run(bridge, scope("GET", "/health"), Exchange())
    assert health.status == 200 and health.json() == {"status": "UP", "model_class": "FakeBackend"}


def test_a_content_length_over_the_limit_is_413_unread(fake: FakeBackend) -> None:
    bridge = locked_bridge(fake)
    auth = basic(USER, PASSWORD)
    for path, size in (("/predict", 64 * 2**20 + 1), ("/setup", 2**20 + 1)):
        headers = {**auth, "Content-Length": str(size)}
        exchange = run(bridge, scope("POST", path, headers), Exchange([None]))
        assert exchange.status == 413 and exchange.received == 0, path
    assert "1 MiB, the most /setup takes" in exchange.json()["error"]
    bad = run(bridge, scope("POST", "/setup", {**auth, "Content-Length": "1e3"}), Exchange([None]))
    assert bad.status == 400
    assert bridge.rules.budget.used == 0


def test_a_chunked_body_over_the_limit_is_413(fake: FakeBackend) -> None:
    bridge = locked_bridge(fake, max_body_bytes=4096)
    headers = {**basic(USER, PASSWORD), "Transfer-Encoding": "chunked"}
    body = json.dumps(PREDICT_BODY).encode()
    ok = run(bridge, scope("POST", "/predict", headers), Exchange([body[:10], body[10:]]))
    assert ok.status == 200 and len(ok.json()["results"]) == 2
    big = Exchange([body[:10], b" " * 4000, b" " * 4000, None])
    refused = run(bridge, scope("POST", "/predict", headers), big)
    assert refused.status == 413 and big.chunks == [None]  # stopped reading at the limit
    assert bridge.rules.budget.used == 0


def test_a_body_that_does_not_come_is_408_and_gives_its_memory_back(fake: FakeBackend) -> None:
    bridge = locked_bridge(fake)
    bridge.body_seconds = 0.2
    headers = {**basic(USER, PASSWORD), "Content-Length": "1000"}
    exchange = run(bridge, scope("POST", "/setup", headers), Exchange([b"{", None]))
    assert exchange.status == 408
    assert bridge.rules.budget.used == 0 and fake.calls == []


def test_a_client_gone_mid_body_gets_nothing(fake: FakeBackend) -> None:
    bridge = locked_bridge(fake)
    headers = {**basic(USER, PASSWORD), "Content-Length": "1000"}
    exchange = run(bridge, scope("POST", "/setup", headers), Exchange([b"{"], disconnect=True))
    assert exchange.sent == [] and bridge.rules.budget.used == 0 and fake.calls == []


def test_bodies_come_out_of_the_memory_budget(fake: FakeBackend) -> None:
    budget = MemoryBudget(10_000)
    app = create_app(as_backend(fake), basic_auth=None, budget=budget)
    bridge = WsgiBridge(app, app.extensions["wafermap.request_rules"], threads=2)
    body = json.dumps(PREDICT_BODY).encode()
    headers = {"Content-Length": str(len(body))}
    assert budget.take(9_900)
    busy = run(bridge, scope("POST", "/predict", headers), Exchange([body]))
    assert busy.status == 503 and busy.headers["retry-after"] == "5" and busy.received == 0
    budget.give(9_900)
    assert run(bridge, scope("POST", "/predict", headers), Exchange([body])).status == 200
    assert budget.used == 0


def test_health_has_a_lane_of_its_own() -> None:
    """Every thread of the main pool busy (a 100 s /predict, say): /health still answers."""
    release = threading.Event()
    entered = threading.Event()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ["PATH_INFO"] != "/health":
            entered.set()
            release.wait(10)
        start_response("200 OK", [("Content-Type", "application/json")])
        return [b"{}"]

    bridge = WsgiBridge(app, RequestRules(), threads=1)

    async def scenario() -> tuple[int | None, int | None, bool]:
        slow, quick, queued = Exchange(), Exchange(), Exchange()
        busy = asyncio.create_task(bridge(scope("GET", "/metrics"), slow.receive, slow.send))
        behind = asyncio.create_task(bridge(scope("GET", "/versions"), queued.receive, queued.send))
        await asyncio.to_thread(entered.wait, 10)
        await asyncio.wait_for(bridge(scope("GET", "/health"), quick.receive, quick.send), 2)
        waiting = not behind.done()
        release.set()
        await busy
        await behind
        return quick.status, queued.status, waiting

    health, behind, waited = asyncio.run(scenario())
    assert health == 200 and waited and behind == 200
    bridge.close()


def test_an_app_that_fails_is_a_json_500() -> None:
    def broken(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        raise RuntimeError("boom")

    exchange = run(WsgiBridge(broken, RequestRules(), threads=1), scope("GET", "/x"), Exchange())
    assert exchange.status == 500 and "error" in exchange.json()


def test_lifespan_is_answered() -> None:
    bridge = WsgiBridge(echo_app([]), RequestRules(), threads=1)
    messages = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[Message] = []

    async def receive() -> Message:
        return messages.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(bridge({"type": "lifespan"}, receive, send))
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
