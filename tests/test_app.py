"""The HTTP protocol, against a small fake `MLBackend` (the seam between app and model)."""

from __future__ import annotations

import base64
import io
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import flask
import pytest
from flask.testing import FlaskClient
from werkzeug.test import EnvironBuilder, run_wsgi_app

from backend.app import (
    MemoryBudget,
    MLBackend,
    RequestLimits,
    RequestRules,
    create_app,
    parse_cost,
    request_rules,
)

USER, PASSWORD = "labeler", "s3cret-pass"
LS_TOKEN = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class FakeBackend:
    version: str = "wafer-v1"
    fail_predict: bool = False
    wrong_count: bool = False
    calls: list[tuple[str, Any]] = field(default_factory=list)
    projects: list[str | None] = field(default_factory=list)
    payloads: list[dict[str, Any]] = field(default_factory=list)

    def versions(self, project: str | None) -> list[str]:
        self.calls.append(("versions", project))
        return ["wafer-v0", self.version]

    def health(self) -> dict[str, Any]:
        return {"projects": {"1": self.version}, "problems": []}

    def setup(self, project: str, schema: str, extra: Mapping[str, Any]) -> str:
        self.calls.append(("setup", (project, schema, dict(extra))))
        return self.version

    def predict(
        self, tasks: list[dict[str, Any]], context: Mapping[str, Any] | None, project: str | None
    ) -> list[dict[str, Any]]:
        self.calls.append(("predict", (tasks, context)))
        self.projects.append(project)
        if self.fail_predict:
            raise RuntimeError("model file is damaged")
        entries = [
            {
                "result": [
                    {
                        "from_name": "failure_type",
                        "to_name": "wafer_map",
                        "type": "choices",
                        "value": {"choices": ["Center"]},
                    }
                ],
                "score": 0.5 + 0.1 * i,
                "model_version": self.version,
            }
            for i, _ in enumerate(tasks)
        ]
        return entries[:-1] if self.wrong_count else entries

    def webhook(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        self.calls.append(("webhook", payload["action"]))
        self.payloads.append(dict(payload))
        return {"status": "queued", "action": payload["action"]}

    def metrics(self) -> dict[str, Any]:
        return {"model_version": self.version, "predictions": 3}


def as_backend(fake: FakeBackend) -> MLBackend:
    return fake  # mypy checks here that the fake implements the protocol


@pytest.fixture
def fake() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def client(fake: FakeBackend) -> FlaskClient:
    return create_app(as_backend(fake), basic_auth=None).test_client()


@pytest.fixture
def locked(fake: FakeBackend) -> FlaskClient:
    return create_app(as_backend(fake), basic_auth=(USER, PASSWORD)).test_client()


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


TASKS = [
    {"id": 7, "data": {"image": "/data/upload/1/a.png"}, "project": 1},
    {"id": 8, "data": {"image": "/data/upload/1/b.png"}, "project": 1},
]
PREDICT_BODY = {
    "tasks": TASKS,
    "project": "1.1700000000",
    "label_config": "<View/>",
    "params": {"login": None, "password": None, "context": None},
}


def test_health(client: FlaskClient) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json == {
        "status": "UP",
        "model_class": "FakeBackend",
        "projects": {"1": "wafer-v1"},
        "problems": [],
    }


def test_setup(client: FlaskClient, fake: FakeBackend) -> None:
    body = {
        "project": "3.1700000000",
        "schema": "<View>...</View>",
        "hostname": "http://localhost:8080",
        "access_token": LS_TOKEN,
        "extra_params": None,
    }
    response = client.post("/setup", json=body)
    assert response.status_code == 200
    assert response.json == {"model_version": "wafer-v1"}
    assert fake.calls == [("setup", ("3.1700000000", "<View>...</View>", {}))]
    response = client.post("/setup", json={**body, "extra_params": {"a": 1}, "project": 4})
    assert fake.calls[-1] == ("setup", ("4", "<View>...</View>", {"a": 1}))
    # Label Studio keeps extra_params as free JSON: text holding an object, or empty text.
    client.post("/setup", json={**body, "extra_params": '{"b": 2}'})
    assert fake.calls[-1] == ("setup", ("3.1700000000", "<View>...</View>", {"b": 2}))
    client.post("/setup", json={**body, "extra_params": ""})
    assert fake.calls[-1] == ("setup", ("3.1700000000", "<View>...</View>", {}))


@pytest.mark.parametrize(
    "body",
    [
        {"project": "1.1"},
        {"schema": ""},
        {"schema": "<View/>", "project": ["x"]},
        {"schema": "<View/>", "extra_params": [1]},
        {"schema": "<View/>", "extra_params": "{not json"},
        [1, 2],
    ],
)
def test_setup_rejects_bad_bodies(client: FlaskClient, fake: FakeBackend, body: Any) -> None:
    response = client.post("/setup", json=body)
    assert response.status_code == 400
    assert response.json is not None and response.json["error"]
    assert fake.calls == []


def test_predict(client: FlaskClient, fake: FakeBackend) -> None:
    response = client.post("/predict", json=PREDICT_BODY)
    assert response.status_code == 200
    assert response.json is not None
    results = response.json["results"]
    assert len(results) == 2
    assert results[0]["result"][0]["value"] == {"choices": ["Center"]}
    assert results[1]["score"] == pytest.approx(0.6)
    assert fake.calls == [("predict", (TASKS, None))]
    context: dict[str, Any] = {"result": []}
    client.post("/predict", json={**PREDICT_BODY, "params": {"context": context}})
    assert fake.calls[-1] == ("predict", (TASKS, context))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "'tasks' must be a list"),
        ({"tasks": {"id": 1}}, "'tasks' must be a list"),
        ({"tasks": [1, 2]}, "every entry"),
        ({"tasks": TASKS, "params": "x"}, "'params'"),
        ({"tasks": TASKS, "params": {"context": [1]}}, "'context'"),
    ],
)
def test_predict_rejects_bad_bodies(
    client: FlaskClient, fake: FakeBackend, body: Any, message: str
) -> None:
    response = client.post("/predict", json=body)
    assert response.status_code == 400
    assert response.json is not None and message in response.json["error"]
    assert fake.calls == []


@pytest.mark.parametrize("path", ["/predict", "/setup", "/webhook"])
def test_bodies_that_are_not_json_objects(client: FlaskClient, path: str) -> None:
    for data, content_type in [
        ("{not json", "application/json"),
        ("tasks=1", "application/x-www-form-urlencoded"),
        ("", "application/json"),
        ("null", "application/json"),
        ('"text"', "application/json"),
    ]:
        response = client.post(path, data=data, content_type=content_type)
        assert response.status_code == 400, (path, data)
        assert response.json is not None
        assert response.json["error"].startswith("the request body must be a JSON object")


def test_an_error_inside_predict_is_a_json_500_without_a_traceback(
    client: FlaskClient, fake: FakeBackend, caplog: pytest.LogCaptureFixture
) -> None:
    fake.fail_predict = True
    with caplog.at_level(logging.ERROR, logger="backend.app"):
        response = client.post("/predict", json=PREDICT_BODY)
    assert response.status_code == 500
    assert response.is_json
    assert response.json == {"error": "predict failed: RuntimeError: model file is damaged"}
    assert "Traceback" not in response.get_data(as_text=True)
    assert "Traceback" in caplog.text or caplog.records[0].exc_info is not None  # in the log


def test_a_wrong_number_of_results_is_a_500(client: FlaskClient, fake: FakeBackend) -> None:
    fake.wrong_count = True
    response = client.post("/predict", json=PREDICT_BODY)
    assert response.status_code == 500
    assert response.json is not None and "1 results for 2 tasks" in response.json["error"]


def test_webhook(client: FlaskClient, fake: FakeBackend) -> None:
    payload = {"action": "ANNOTATION_CREATED", "annotation": {"id": 1}, "project": {"id": 1}}
    response = client.post("/webhook", json=payload)
    assert response.status_code == 200
    assert response.json == {"status": "queued", "action": "ANNOTATION_CREATED"}
    response = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}})
    assert response.status_code == 200
    assert fake.calls == [("webhook", "ANNOTATION_CREATED"), ("webhook", "START_TRAINING")]


def test_a_bulk_webhook_without_payload_takes_the_project_from_its_url(
    client: FlaskClient, fake: FakeBackend
) -> None:
    response = client.post("/webhook?project=7", json={"action": "ANNOTATIONS_CREATED"})
    assert response.status_code == 200
    # a payload's own project wins over the URL's
    client.post("/webhook?project=7", json={"action": "TASKS_CREATED", "project": {"id": 2}})
    assert fake.payloads == [
        {"action": "ANNOTATIONS_CREATED", "project": "7"},
        {"action": "TASKS_CREATED", "project": {"id": 2}},
    ]


@pytest.mark.parametrize("payload", [{}, {"action": ""}, {"action": 3}, {"project": {"id": 1}}])
def test_webhook_without_an_action(client: FlaskClient, fake: FakeBackend, payload: Any) -> None:
    response = client.post("/webhook", json=payload)
    assert response.status_code == 400
    assert response.json is not None and "'action'" in response.json["error"]
    assert fake.calls == []


def test_metrics_json(client: FlaskClient) -> None:
    response = client.get("/metrics.json")
    assert response.status_code == 200
    assert response.json == {"model_version": "wafer-v1", "predictions": 3}


def test_metrics_are_prometheus_text_counting_requests_and_wafers(client: FlaskClient) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    assert client.post("/predict", json={"tasks": [{"data": {}}] * 3}).status_code == 200
    client.get("/health")
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain; version=0.0.4")
    found = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.get_data(as_text=True))
        for s in family.samples
    }
    post = (("method", "POST"), ("route", "/predict"), ("status", "200"))
    assert found[("wafer_http_requests_total", post)] == 1
    assert found[("wafer_http_request_duration_seconds_count", (("route", "/health"),))] == 1
    assert found[("wafer_predicted_wafers_total", ())] == 3


def test_unknown_routes_and_methods_answer_json(client: FlaskClient) -> None:
    assert client.get("/nope").status_code == 404
    response = client.get("/predict")
    assert response.status_code == 405
    assert response.is_json and response.json is not None and response.json["error"]


class _UnreadableBody(io.RawIOBase):
    """A request body that fails the test if anything reads it."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        raise AssertionError("the body was read although Content-Length is over the limit")


def test_oversized_bodies_are_refused_before_reading(fake: FakeBackend) -> None:
    limits = RequestLimits(max_body_bytes=2048)
    app = create_app(as_backend(fake), basic_auth=None, limits=limits)
    small = app.test_client()
    response = small.post("/predict", json={"tasks": [{"data": {"image": "x" * 3000}}]})
    assert response.status_code == 413
    assert response.json is not None and "WAFER_MAX_REQUEST_MB" in response.json["error"]
    # Content-Length says too much: refused without reading a byte.
    environ = EnvironBuilder(path="/predict", method="POST").get_environ()
    environ.update({"CONTENT_LENGTH": str(64 * 2**20), "wsgi.input": _UnreadableBody()})
    body, status, _ = run_wsgi_app(app, environ, buffered=True)
    assert status.startswith("413")
    assert b"WAFER_MAX_REQUEST_MB" in b"".join(body)
    assert fake.calls == []


def test_huge_request_of_empty_tasks_is_refused_fast_and_small(
    client: FlaskClient, fake: FakeBackend, caplog: pytest.LogCaptureFixture
) -> None:
    """The review's 4 MiB of {"tasks":[{},{},...]}: 1.4 M tasks, over the task cap."""
    body = b'{"tasks":[' + b",".join([b"{}"] * (4 * 2**20 // 3)) + b"]}"
    assert len(body) >= 4 * 2**20
    with caplog.at_level(logging.DEBUG):
        response = client.post("/predict", data=body, content_type="application/json")
    assert response.status_code == 400
    assert response.json is not None
    assert "too many tasks in one /predict: 1398101" in response.json["error"]
    assert "WAFER_MAX_TASKS" in response.json["error"]
    assert len(response.get_data()) < 300
    assert fake.calls == []
    assert len(caplog.records) <= 1


def test_the_task_cap_is_configurable(fake: FakeBackend) -> None:
    capped = create_app(as_backend(fake), basic_auth=None, limits=RequestLimits(max_tasks=2))
    client = capped.test_client()
    assert client.post("/predict", json=PREDICT_BODY).status_code == 200
    response = client.post("/predict", json={**PREDICT_BODY, "tasks": TASKS + TASKS[:1]})
    assert response.status_code == 400
    assert response.json is not None and "the limit is 2" in response.json["error"]


@pytest.mark.parametrize("path", ["/predict", "/setup", "/webhook", "/versions"])
@pytest.mark.parametrize(
    "body",
    [b"[" * 100_000, b'{"a":' * 100_000, b'{"tasks": [' + b"[" * 50_000],
    ids=["lists", "objects", "inside-tasks"],
)
def test_deeply_nested_json_is_a_400(
    client: FlaskClient, fake: FakeBackend, path: str, body: bytes
) -> None:
    response = client.open(path, method="GET" if path == "/versions" else "POST", data=body)
    assert response.status_code == 400
    assert response.json is not None and "nested too deeply" in response.json["error"]
    assert fake.calls == []


@pytest.mark.parametrize(
    "body", [b'{"tasks": [], "x": NaN}', b'{"tasks": [], "x": -Infinity}', b'{"tasks": [1e999]}']
)
def test_numbers_json_does_not_have_are_a_400(client: FlaskClient, body: bytes) -> None:
    response = client.post("/predict", data=body)
    assert response.status_code == 400
    assert response.json is not None and "not JSON" in response.json["error"]


def test_the_project_reaches_the_backend(client: FlaskClient, fake: FakeBackend) -> None:
    client.post("/predict", json=PREDICT_BODY)
    without = {"tasks": TASKS}  # older callers: the project only in the tasks
    client.post("/predict", json=without)
    client.post("/predict", json={"tasks": [*TASKS, {**TASKS[0], "project": 2}]})
    assert fake.projects == ["1.1700000000", "1", None]
    assert client.post("/predict", json={**PREDICT_BODY, "project": [1]}).status_code == 400


def test_versions_as_label_studio_asks(client: FlaskClient, fake: FakeBackend) -> None:
    # Label Studio 1.23.2 sends GET /versions with {"project": "<id>.<created>"} as JSON body.
    response = client.open("/versions", method="GET", json={"project": "3.1700000000"})
    assert response.status_code == 200
    assert response.json == {"versions": ["wafer-v0", "wafer-v1"]}
    client.get("/versions?project=4")
    client.get("/versions")
    assert fake.calls == [("versions", "3.1700000000"), ("versions", "4"), ("versions", None)]


def test_a_full_backend_answers_503_at_once_and_health_still_answers(fake: FakeBackend) -> None:
    """/predict requests over the budget are refused without waiting; /health never waits."""
    release, entered = threading.Event(), threading.Event()
    slow = SlowBackend(release=release, entered=entered)
    app = create_app(
        as_backend(slow), basic_auth=None, limits=RequestLimits(predict_requests=1, predict_slots=1)
    )
    first: list[int] = []
    worker = threading.Thread(
        target=lambda: first.append(
            app.test_client().post("/predict", json=PREDICT_BODY).status_code
        )
    )
    worker.start()
    try:
        assert entered.wait(10)
        busy = app.test_client().post("/predict", json=PREDICT_BODY)
        assert busy.status_code == 503
        assert busy.headers["Retry-After"] == "5"
        assert busy.json is not None and "WAFER_PREDICT_REQUESTS" in busy.json["error"]
        assert app.test_client().get("/health").status_code == 200
    finally:
        release.set()
        worker.join(10)
    assert first == [200]
    assert app.test_client().post("/predict", json=PREDICT_BODY).status_code == 200


@dataclass
class SlowBackend(FakeBackend):
    """Predictions that wait until the test releases them."""

    release: threading.Event = field(default_factory=threading.Event)
    entered: threading.Event = field(default_factory=threading.Event)

    def predict(
        self, tasks: list[dict[str, Any]], context: Mapping[str, Any] | None, project: str | None
    ) -> list[dict[str, Any]]:
        self.entered.set()
        self.release.wait(10)
        return super().predict(tasks, context, project)


def test_an_open_backend_says_so(fake: FakeBackend, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="backend.app"):
        create_app(as_backend(fake), basic_auth=None)
    assert "NO AUTHENTICATION" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="backend.app"):
        create_app(as_backend(fake), basic_auth=(USER, PASSWORD))
    assert "NO AUTHENTICATION" not in caplog.text


def test_required_auth_refuses_to_start_without_credentials(fake: FakeBackend) -> None:
    with pytest.raises(ValueError, match="BASIC_AUTH_USER and BASIC_AUTH_PASS"):
        create_app(as_backend(fake), basic_auth=None, require_auth=True)
    app = create_app(as_backend(fake), basic_auth=(USER, PASSWORD), require_auth=True)
    assert app.test_client().get("/metrics").status_code == 401


def test_health_needs_no_credentials(locked: FlaskClient) -> None:
    response = locked.get("/health")
    assert response.status_code == 200
    assert response.json is not None and response.json["status"] == "UP"


ROUTES = [
    ("GET", "/metrics", None),
    ("GET", "/metrics.json", None),
    ("POST", "/setup", {"project": "1.1", "schema": "<View/>"}),
    ("POST", "/predict", PREDICT_BODY),
    ("POST", "/webhook", {"action": "START_TRAINING", "project": {"id": 1}}),
]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
@pytest.mark.parametrize(
    "headers",
    [
        {},
        basic(USER, "wrong"),
        basic("someone", PASSWORD),
        basic(USER, PASSWORD + "x"),
        {"Authorization": f"Token {LS_TOKEN}"},
        {"Authorization": "Basic !!!not-base64"},
    ],
    ids=["none", "wrong-password", "wrong-user", "longer-password", "token", "garbage"],
)
def test_auth_refuses_without_the_right_credentials(
    locked: FlaskClient,
    fake: FakeBackend,
    method: str,
    path: str,
    body: Any,
    headers: dict[str, str],
) -> None:
    response = locked.open(path, method=method, json=body, headers=headers)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Basic")
    assert response.is_json and response.json is not None and response.json["error"]
    assert fake.calls == []


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_auth_lets_the_right_credentials_in(
    locked: FlaskClient, method: str, path: str, body: Any
) -> None:
    response = locked.open(path, method=method, json=body, headers=basic(USER, PASSWORD))
    assert response.status_code == 200, response.json


def test_auth_comes_before_body_checks(locked: FlaskClient) -> None:
    assert locked.post("/predict", data="{bad").status_code == 401
    assert locked.post("/predict", data="{bad", headers=basic(USER, PASSWORD)).status_code == 400


@pytest.mark.parametrize("pair", [("", "x"), ("x", ""), ("only-one",)])
def test_auth_settings_are_checked(fake: FakeBackend, pair: Any) -> None:
    with pytest.raises(ValueError, match="basic_auth"):
        create_app(as_backend(fake), basic_auth=pair)


def test_nothing_from_requests_reaches_the_log(
    locked: FlaskClient, fake: FakeBackend, caplog: pytest.LogCaptureFixture
) -> None:
    fake.fail_predict = True
    secret_body = {**PREDICT_BODY, "params": {"login": "ls-user", "password": "data-pass-123"}}
    with caplog.at_level(logging.DEBUG):
        locked.post("/predict", json=secret_body, headers=basic(USER, PASSWORD))
        locked.post(
            "/setup", json={"schema": "<View/>", "access_token": LS_TOKEN}, headers=basic(USER, "x")
        )
    logged = caplog.text + "".join(str(r.args) for r in caplog.records)
    for secret in (PASSWORD, "data-pass-123", LS_TOKEN, "/data/upload/1/a.png"):
        assert secret not in logged


def test_app_is_a_flask_app(fake: FakeBackend) -> None:
    app = create_app(as_backend(fake), basic_auth=None)
    assert isinstance(app, flask.Flask)
    assert {r.rule for r in app.url_map.iter_rules()} >= {
        "/health",
        "/setup",
        "/predict",
        "/webhook",
        "/metrics",
        "/metrics.json",
        "/versions",
    }


# ---- issue 15: what the head decides, per-route limits, memory, the webhook's own token -------

WEBHOOK_TOKEN = "hook-token-abc"


@pytest.fixture
def hooked(fake: FakeBackend) -> flask.Flask:
    return create_app(as_backend(fake), basic_auth=(USER, PASSWORD), webhook_token=WEBHOOK_TOKEN)


def test_health_without_credentials_says_only_that_it_is_up(hooked: flask.Flask) -> None:
    client = hooked.test_client()
    assert client.get("/health").json == {"status": "UP", "model_class": "FakeBackend"}
    bearer = {"Authorization": f"Bearer {WEBHOOK_TOKEN}"}
    assert set(client.get("/health", headers=bearer).json or {}) == {"status", "model_class"}
    full = client.get("/health", headers=basic(USER, PASSWORD)).json
    assert full is not None and full["projects"] == {"1": "wafer-v1"}


def test_the_webhook_token_opens_the_webhook_and_nothing_else(
    hooked: flask.Flask, fake: FakeBackend
) -> None:
    client = hooked.test_client()
    bearer = {"Authorization": f"Bearer {WEBHOOK_TOKEN}"}
    event = {"action": "START_TRAINING", "project": {"id": 1}}
    assert client.post("/webhook", json=event, headers=bearer).status_code == 200
    assert client.post("/webhook", json=event, headers=basic(USER, PASSWORD)).status_code == 200
    for headers in ({"Authorization": "Bearer hook-token-abd"}, {"Authorization": "Bearer"}, {}):
        assert client.post("/webhook", json=event, headers=headers).status_code == 401
    for method, path, body in ROUTES:
        if path != "/webhook":
            refused = client.open(path, method=method, json=body, headers=bearer)
            assert refused.status_code == 401, path
    assert client.get("/versions", headers=bearer).status_code == 401
    assert [c[0] for c in fake.calls] == ["webhook", "webhook"]


def test_an_open_backend_needs_no_webhook_token(client: FlaskClient) -> None:
    event = {"action": "START_TRAINING", "project": {"id": 1}}
    assert client.post("/webhook", json=event).status_code == 200
    assert client.get("/health").json == {
        "status": "UP",
        "model_class": "FakeBackend",
        "projects": {"1": "wafer-v1"},
        "problems": [],
    }


def test_setup_and_versions_take_small_bodies_webhooks_large_ones(
    client: FlaskClient, fake: FakeBackend
) -> None:
    """Label Studio batches up to 5,000 tasks with their data into one webhook, so /webhook
    takes as much as /predict; /setup and /versions take 1 MiB."""
    padding = " " * (2 * 2**20)
    setup = client.post("/setup", data='{"schema": "<View/>"}' + padding)
    assert setup.status_code == 413
    assert setup.json is not None and "1 MiB, the most /setup takes" in setup.json["error"]
    versions = client.open("/versions", method="GET", data='{"project": "1"}' + padding)
    assert versions.status_code == 413
    hook = client.post("/webhook", data='{"action": "TASKS_CREATED"}' + padding)
    assert hook.status_code == 200
    assert [c[0] for c in fake.calls] == ["webhook"]


class _Chunks(io.RawIOBase):
    """A chunked body as a server that decodes chunks hands it over (no Content-Length)."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        chunk = self._data.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)


@pytest.mark.parametrize(("extra", "status"), [(0, 200), (1, 413), (5000, 413)])
def test_a_chunked_body_over_the_limit_is_413_never_cut(
    fake: FakeBackend, extra: int, status: int
) -> None:
    """A chunked body was cut at the limit and the cut processed (200)."""
    app = create_app(as_backend(fake), basic_auth=None, limits=RequestLimits(max_body_bytes=2048))
    body = b'{"tasks": []}'
    body += b" " * (2048 - len(body) + extra)
    environ = EnvironBuilder(path="/predict", method="POST").get_environ()
    environ.pop("CONTENT_LENGTH", None)
    environ.update({"wsgi.input": _Chunks(body), "wsgi.input_terminated": True})
    answer, status_line, _ = run_wsgi_app(app, environ, buffered=True)
    assert status_line.startswith(str(status)), b"".join(answer)
    assert len(fake.calls) == (1 if status == 200 else 0)


def test_memory_is_admitted_before_parsing(fake: FakeBackend) -> None:
    """4 MiB of `{}` under a 64 MiB budget: ~250 MiB to parse (the review's 64 MiB of `{}` took
    1.5 GB). Refused before parsing with 413; a body that fits but finds the budget taken by
    others gets 503; whatever a request takes comes back when it ends."""
    budget = MemoryBudget(64 * 2**20)
    app = create_app(as_backend(fake), basic_auth=None, budget=budget)
    client = app.test_client()
    body = b'{"tasks": [' + b",".join([b"{}"] * (4 * 2**20 // 3)) + b"]}"
    assert parse_cost(body) > budget.total
    refused = client.post("/predict", data=body)
    assert refused.status_code == 413
    assert refused.json is not None and "WAFER_REQUEST_MEMORY_MB" in refused.json["error"]
    assert fake.calls == [] and budget.used == 0
    assert budget.take(budget.total - 1000)
    busy = client.post("/predict", json=PREDICT_BODY)
    assert busy.status_code == 503 and busy.headers["Retry-After"] == "5"
    budget.give(budget.total - 1000)
    assert client.post("/predict", json=PREDICT_BODY).status_code == 200
    assert client.post("/setup", json={"schema": "<View/>"}).status_code == 200
    assert client.post("/predict", data=b"{not json").status_code == 400
    assert budget.used == 0


def test_the_server_finds_the_apps_rules(hooked: flask.Flask) -> None:
    rules = request_rules(hooked)
    assert isinstance(rules, RequestRules)
    assert rules.body_limit("/predict") == rules.body_limit("/webhook") == 64 * 2**20
    assert rules.body_limit("/setup") == rules.body_limit("/nope") == 2**20
    assert rules.refusal("/health", None) is None
    assert rules.refusal("/predict", None) == (
        401,
        "authentication required: wrong or missing credentials",
    )
    assert rules.refusal("/webhook", f"Bearer {WEBHOOK_TOKEN}") is None
    assert rules.refusal("/predict", f"Bearer {WEBHOOK_TOKEN}") is not None
    assert request_rules(object()) is None
