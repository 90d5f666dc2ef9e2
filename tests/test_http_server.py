"""The backend as users start it (gunicorn `_wsgi:app` with gunicorn.conf.py) on real sockets:
slow and silent clients, memory per request, body limits, credentials, project ids, the model
cache and the control socket (issue 15, "Hardening, round 2").

One backend serves the module: a tiny resnet18 for project 2 and 20 small WaferCNN models
(projects 101-120, more than the 16 stores the service keeps open), basic auth on, a webhook
secret, Redis db 15, and a HOME of its own (where gunicorn would put its control socket). Each
test prints its figures (`pytest -s`).
"""

from __future__ import annotations

import base64
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from redis import Redis
from rq import Queue

from backend.classifier import WaferClassifier, build_network
from backend.harness.stack import free_port, running_backend
from backend.label_config import LabelConfig
from backend.loop_keys import EVENTS_QUEUE
from backend.model_card import ModelCard
from backend.model_store import ModelStore
from tests.conftest import TEST_REDIS_URL
from tests.test_service import PROJECT, VERSION, publish_tiny_model

pytestmark = pytest.mark.slow

AUTH = ("labeler", "s3cret-pass")
WEBHOOK_SECRET = "hook-secret-0123456789abcdef"
MANY_PROJECTS = range(101, 121)
MiB = 2**20


@dataclass(frozen=True)
class Served:
    url: str
    port: int
    log_path: Path
    home: Path
    model_dir: Path

    def worker_pid(self) -> int:
        found = re.findall(r"Booting worker with pid: (\d+)", self.log_path.read_text())
        assert found, self.log_path.read_text()[-2000:]
        return int(found[-1])

    def proc(self, name: str) -> str:
        return Path(f"/proc/{self.worker_pid()}/{name}").read_text()

    def peak_mib(self) -> float:
        """The worker's peak resident memory (VmHWM), MiB."""
        match = re.search(r"VmHWM:\s+(\d+) kB", self.proc("status"))
        assert match
        return int(match.group(1)) / 1024

    def bytes_read(self) -> int:
        """Bytes the worker has read from files and sockets so far (/proc/<pid>/io rchar)."""
        match = re.search(r"rchar: (\d+)", self.proc("io"))
        assert match
        return int(match.group(1))


def publish_small_model(model_dir: Path, labels: LabelConfig, project: int) -> None:
    n = len(labels.failure_types)
    card = ModelCard(
        version="v001-set0",
        failure_types=labels.failure_types,
        image_size=16,
        backbone="wafercnn",
        logit_adjustment=(0.0,) * n,
        trained_through_set=0,
        metrics={"route_threshold": 0.5},
    )
    network = build_network("wafercnn", n, seed=project)
    store = ModelStore.for_project(model_dir, project, torch.device("cpu"))
    store.publish(WaferClassifier(network=network, card=card, device=torch.device("cpu")))


@pytest.fixture(scope="module")
def backend(
    tmp_path_factory: pytest.TempPathFactory, label_config: LabelConfig
) -> Iterator[Served]:
    work = tmp_path_factory.mktemp("http-server")
    model_dir, home = work / "models", work / "home"
    home.mkdir()
    publish_tiny_model(model_dir, label_config)
    for project in MANY_PROJECTS:
        publish_small_model(model_dir, label_config, project)
    env = {
        "MODEL_DIR": str(model_dir),
        "REDIS_URL": TEST_REDIS_URL,
        "LABEL_STUDIO_URL": "http://127.0.0.1:1",
        "LABEL_STUDIO_API_KEY": "",
        "WAFER_DEVICE": "cpu",
        "WAFER_BACKBONE": "resnet18",
        "BASIC_AUTH_USER": AUTH[0],
        "BASIC_AUTH_PASS": AUTH[1],
        "WAFER_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "HOME": str(home),
        "XDG_RUNTIME_DIR": "",
    }
    port = free_port()
    log_path = work / "backend.log"
    with running_backend(env, port, log_path) as url:
        yield Served(url, port, log_path, home, model_dir)


def basic() -> dict[str, str]:
    token = base64.b64encode(":".join(AUTH).encode()).decode()
    return {"Authorization": f"Basic {token}"}


def timed_get(url: str, **kwargs: Any) -> tuple[int, float]:
    began = time.monotonic()
    try:
        status = httpx.get(url, timeout=kwargs.pop("timeout", 1.0), **kwargs).status_code
    except httpx.TimeoutException:
        status = 0
    return status, time.monotonic() - began


# ---- row 4: memory is bounded before parsing --------------------------------------------------


def test_a_body_of_empty_objects_is_refused_before_parsing(backend: Served) -> None:
    """64 MiB of `{}` took +1.5 GB a request (4.5 GB peak for two at once) before the task cap
    refused it; now the structural pre-scan refuses it (413) within the memory budget."""
    count = (64 * MiB - 64) // 3
    body = b'{"project": "2", "tasks": [' + b"{}," * (count - 1) + b"{}]}"
    assert len(body) <= 64 * MiB
    before = backend.peak_mib()
    answers: list[tuple[int, float, str]] = []

    def post() -> None:
        began = time.monotonic()
        response = httpx.post(f"{backend.url}/predict", content=body, headers=basic(), timeout=300)
        answers.append((response.status_code, time.monotonic() - began, response.text[:200]))

    callers = [threading.Thread(target=post) for _ in range(2)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    grown = backend.peak_mib() - before
    print(f"\ntwo 64 MiB bodies of {{}}: {answers}; worker peak +{grown:.0f} MiB")
    assert [status for status, _, _ in answers] == [413, 413], answers
    assert all("WAFER_REQUEST_MEMORY_MB" in text for _, _, text in answers)
    assert grown < 600
    assert httpx.get(f"{backend.url}/health", timeout=1.0).status_code == 200


def test_setup_and_versions_take_small_bodies_only(backend: Served) -> None:
    """/setup and /versions had no gate of their own (64 MiB parsed whole): 1 MiB now."""
    schema = "<View/>" + " " * (2 * MiB)
    big = json.dumps({"project": "2.1700000000", "schema": schema}).encode()
    for method, path in (("POST", "/setup"), ("GET", "/versions")):
        response = httpx.request(
            method, f"{backend.url}{path}", content=big, headers=basic(), timeout=30
        )
        print(f"\n{method} {path} with 2 MiB: {response.status_code} {response.text[:120]}")
        assert response.status_code == 413, (path, response.text[:200])
        assert "1 MiB" in response.json()["error"]
    small = httpx.get(f"{backend.url}/versions?project=2", headers=basic(), timeout=5)
    assert small.json() == {"versions": [VERSION]}


# ---- row 10: a chunked body over the limit ----------------------------------------------------


def test_a_chunked_body_over_the_limit_is_413_not_cut(backend: Served) -> None:
    """A chunked body was cut at 64 MiB and the cut processed (200)."""
    head = b'{"project": "2.1700000000", "tasks": []}'
    size = 64 * MiB + 4096

    def chunks() -> Iterator[bytes]:
        yield head
        left = size - len(head)
        while left > 0:
            piece = min(left, MiB)
            yield b" " * piece
            left -= piece

    response = httpx.post(f"{backend.url}/predict", content=chunks(), headers=basic(), timeout=120)
    print(f"\nchunked {size} bytes: {response.status_code} {response.text[:120]}")
    assert response.status_code == 413
    assert "WAFER_MAX_REQUEST_MB" in response.json()["error"]


# ---- row 1: slow and silent clients --------------------------------------------------------------


def test_silent_and_slow_clients_leave_health_and_versions_answering(backend: Served) -> None:
    """24 connections that sent one byte each blocked all 24 gthread threads (/health timed
    out until they closed). 200 such clients now: silent after a byte, a request head that
    never ends, a body that never comes (with and without credentials)."""
    auth = basic()["Authorization"]
    openings = [
        b"G",
        b"GET /health HTTP/1.1\r\nHost: x\r\n",
        b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{",
        f"POST /setup HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n"
        "Content-Length: 1000\r\n\r\n{".encode(),
    ]
    clients: list[socket.socket] = []
    try:
        for i in range(200):
            client = socket.create_connection(("127.0.0.1", backend.port), timeout=5)
            client.sendall(openings[i % len(openings)])
            clients.append(client)
        time.sleep(0.5)
        answers = [timed_get(f"{backend.url}/health") for _ in range(5)]
        versions = timed_get(f"{backend.url}/versions?project=2", headers=basic())
        print(f"\nwith 200 slow clients: /health {answers}, /versions {versions}")
        assert all(status == 200 and took < 1.0 for status, took in answers), answers
        assert versions[0] == 200 and versions[1] < 1.0, versions
    finally:
        for client in clients:
            client.close()


def test_a_silent_connection_is_closed_after_the_head_deadline(backend: Served) -> None:
    """A connection that sends part of a request head and stops is closed (it held a thread
    for as long as the client kept it open)."""
    with socket.create_connection(("127.0.0.1", backend.port), timeout=30) as client:
        client.sendall(b"GET /hea")
        began = time.monotonic()
        try:
            answer = client.recv(1024)
        except TimeoutError:
            answer = None
        took = time.monotonic() - began
    print(f"\nhalf a request head: closed after {took:.1f} s with {answer!r}")
    assert answer is not None, "the server still held the connection after 30 s"
    assert took < 20


# ---- row 13: /health without credentials --------------------------------------------------------


def test_health_without_credentials_says_only_that_it_is_up(backend: Served) -> None:
    bare = httpx.get(f"{backend.url}/health", timeout=5)
    assert bare.status_code == 200
    print(f"\n/health without credentials: {bare.text[:200]}")
    assert bare.json() == {"status": "UP", "model_class": "WaferMapModel"}
    full = httpx.get(f"{backend.url}/health", headers=basic(), timeout=5).json()
    assert full["status"] == "UP"
    assert full["projects"][str(PROJECT)] == VERSION
    assert len(full["projects"]) == 1 + len(MANY_PROJECTS)


# ---- rows 6 and 7: the webhook ----------------------------------------------------------------


def test_the_webhook_secret_opens_the_webhook_and_nothing_else(
    backend: Served, redis: Redis
) -> None:
    bearer = {"Authorization": f"Bearer {WEBHOOK_SECRET}"}
    event = {"action": "START_TRAINING", "project": {"id": PROJECT}}
    hook = httpx.post(f"{backend.url}/webhook", json=event, headers=bearer, timeout=5)
    print(f"\n/webhook with the secret: {hook.status_code} {hook.text[:120]}")
    assert hook.status_code == 200 and hook.json()["status"] == "queued"
    # Label Studio's Start Training comes through the ML backend connection (Basic).
    again = httpx.post(f"{backend.url}/webhook", json=event, headers=basic(), timeout=5)
    assert again.json()["status"] == "already queued"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer"}):
        refused = httpx.post(f"{backend.url}/webhook", json=event, headers=headers, timeout=5)
        assert refused.status_code == 401
    predict = {"project": "2.1700000000", "tasks": []}
    for method, path, body in (
        ("POST", "/predict", predict),
        ("GET", "/metrics", None),
        ("GET", "/versions?project=2", None),
        ("POST", "/setup", {"project": "2", "schema": "<View/>"}),
    ):
        response = httpx.request(
            method, f"{backend.url}{path}", json=body, headers=bearer, timeout=5
        )
        assert response.status_code == 401, path
    bare_health = httpx.get(f"{backend.url}/health", headers=bearer, timeout=5).json()
    assert set(bare_health) == {"status", "model_class"}
    assert Queue(EVENTS_QUEUE, connection=redis).count == 1


def test_webhook_project_ids_that_predict_refuses_queue_nothing(
    backend: Served, redis: Redis
) -> None:
    """Each of these got a debounce key and a job of its own (7 jobs queued)."""
    statuses = {}
    for project in ["-1", 0, "1_000", "+9", 10**30, "٣", "\u0663\u0662", "9" * 20]:
        event = {"action": "START_TRAINING", "project": {"id": project}}
        response = httpx.post(f"{backend.url}/webhook", json=event, headers=basic(), timeout=5)
        statuses[repr(project)] = response.status_code
    queued = Queue(EVENTS_QUEUE, connection=redis).count
    print(f"\nwebhook ids: {statuses}, {queued} jobs queued")
    assert set(statuses.values()) == {400}, statuses
    assert queued == 0 and redis.dbsize() == 0


# ---- row 8: the model cache -------------------------------------------------------------------


def test_health_metrics_and_versions_read_no_weights(backend: Served) -> None:
    """With 21 projects (over the 16 stores kept open) each /health loaded every project's
    weights again; now /health, /metrics and /versions read CURRENT and the cards only."""
    weights = sum(p.stat().st_size for p in backend.model_dir.rglob("*.pt"))
    httpx.get(f"{backend.url}/health", headers=basic(), timeout=30)  # a first look
    time.sleep(1.0)
    before = backend.bytes_read()
    for _ in range(3):
        assert httpx.get(f"{backend.url}/health", headers=basic(), timeout=5).status_code == 200
        assert httpx.get(f"{backend.url}/metrics", headers=basic(), timeout=30).status_code == 200
        got = httpx.get(f"{backend.url}/metrics.json", headers=basic(), timeout=30)
        assert got.status_code == 200
    for project in (2, 101, 999_999, 1_000_000):
        assert (
            httpx.get(
                f"{backend.url}/versions?project={project}", headers=basic(), timeout=30
            ).status_code
            == 200
        )
    time.sleep(2.0)  # a look /health started in the background ends
    read = backend.bytes_read() - before
    print(f"\n3 x (/health, /metrics) + 4 /versions read {read / MiB:.1f} MiB; "
          f"all weights files: {weights / MiB:.1f} MiB")  # fmt: skip
    assert read < weights / 4


def test_metrics_as_served_show_each_projects_model_and_the_queues(backend: Served) -> None:
    """Issue 17 item 5: /metrics in the Prometheus text format from the backend as gunicorn
    serves it, with the loop's state read from MODEL_DIR and rq when scraped."""
    from prometheus_client.parser import text_string_to_metric_families

    answer = httpx.get(f"{backend.url}/metrics", headers=basic(), timeout=30)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(answer.text)}
    served = {
        s.labels["project"]: s.labels["version"] for s in families["wafer_model_info"].samples
    }
    assert served[str(PROJECT)] == VERSION and len(served) == 1 + len(MANY_PROJECTS)
    assert families["wafer_redis_up"].samples[0].value == 1
    states = {s.labels["state"] for s in families["wafer_jobs"].samples}
    assert states == {"queued", "started", "finished", "failed"}
    assert "wafer_http_requests" in families
    assert httpx.get(f"{backend.url}/metrics", timeout=30).status_code == 401


# ---- row 16: gunicorn's control socket --------------------------------------------------------


def test_no_control_socket_is_shared_between_instances(backend: Served) -> None:
    """gunicorn 27 puts one control socket per user ($XDG_RUNTIME_DIR or ~/.gunicorn): a
    second instance took it over and the first one's shutdown deleted it."""
    made = sorted(str(p) for p in backend.home.rglob("*.ctl"))
    print(f"\ncontrol sockets under HOME: {made}")
    assert made == []
