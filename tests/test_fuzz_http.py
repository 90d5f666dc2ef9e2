"""Fuzzing the HTTP routes Label Studio calls: no input may give a 5xx.

Hypothesis drives `/predict`, `/setup`, `/webhook` and `/versions` of the REAL service (a tiny
served model, a real Redis) through the Flask test client with: JSON shaped like Label Studio's
bodies but with wrong types, huge numbers and any unicode; arbitrary JSON; random bytes; deep
nesting. Examples are derandomized (the same inputs every run) and bounded, so the module takes a
few seconds. Every answer must be a JSON 2xx or 4xx; counts per route are printed at the end
(`pytest -s`). A dead Redis must give 503 on /webhook, still never a 500.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis import Redis

from backend.app import create_app
from backend.label_config import DEFAULT_LABEL_CONFIG, LabelConfig
from backend.service import WaferLabelingService
from tests.test_service import (
    DEAD_REDIS_URL,
    picture_task,
    publish_tiny_model,
    settings_for,
)

EXAMPLES = 100
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
#: Per route: inputs sent, 4xx answers, 5xx answers (printed when the module ends).
COUNTS: Counter[tuple[str, str]] = Counter()

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=16,
)
projects = (
    st.sampled_from(["2.1700000000", "2", "5.17", "0.1", "-1", "2.", ".2", "٢.1", "9" * 30])
    | st.integers(min_value=-(10**25), max_value=10**25)
    | json_values
)
PICTURES = [
    picture_task(1, 1)["data"]["image"],
    "data:image/png;base64,AAAA",
    "/data/upload/1/a.png",
]
images = st.sampled_from(PICTURES) | st.text(max_size=40) | json_values
tasks = st.fixed_dictionaries(
    {},
    optional={
        "id": st.integers(min_value=-(10**20), max_value=10**20) | json_values,
        "data": st.fixed_dictionaries({}, optional={"image": images, "set": json_values})
        | json_values,
        "project": projects,
    },
)
GOOD_PROJECTS = st.sampled_from(["2.1700000000", "2", 2, "5.1700000000"])
predict_bodies = st.fixed_dictionaries(
    {"tasks": st.lists(tasks, max_size=4), "project": GOOD_PROJECTS},
    optional={"params": st.fixed_dictionaries({}, optional={"context": json_values})},
) | st.fixed_dictionaries(
    {},
    optional={
        "tasks": st.lists(tasks, max_size=4) | json_values,
        "project": projects,
        "label_config": st.text(max_size=20),
        "params": st.fixed_dictionaries({}, optional={"context": json_values}) | json_values,
    },
)
setup_bodies = st.fixed_dictionaries(
    {"project": GOOD_PROJECTS, "schema": st.just(DEFAULT_LABEL_CONFIG.read_text())},
    optional={"extra_params": json_values | st.text(max_size=20), "hostname": json_values},
) | st.fixed_dictionaries(
    {},
    optional={
        "project": projects,
        "schema": st.sampled_from([DEFAULT_LABEL_CONFIG.read_text(), "<View/>", "<View><Choices"])
        | json_values,
        "extra_params": json_values | st.text(max_size=20),
        "hostname": json_values,
        "access_token": json_values,
    },
)
ACTIONS = ["ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED", "START_TRAINING",
           "TASKS_CREATED", "PROJECT_UPDATED"]  # fmt: skip
webhook_bodies = st.fixed_dictionaries(
    {
        "action": st.sampled_from(ACTIONS),
        "project": st.fixed_dictionaries({"id": st.integers(1, 10**6)}) | GOOD_PROJECTS,
    },
    optional={"annotation": json_values, "annotations": json_values, "task": json_values},
) | st.fixed_dictionaries(
    {},
    optional={
        "action": st.sampled_from(ACTIONS) | json_values,
        "project": st.fixed_dictionaries({}, optional={"id": projects}) | projects,
        "annotation": st.fixed_dictionaries({}, optional={"completed_by": json_values})
        | json_values,
        "annotations": st.lists(json_values, max_size=3) | json_values,
        "task": json_values,
    },
)
raw_bodies = (
    st.binary(max_size=300)
    | st.text(max_size=100).map(str.encode)
    | st.integers(min_value=1, max_value=200_000).map(lambda n: b"[" * n)
    | st.integers(min_value=1, max_value=200_000).map(lambda n: b'{"tasks":' * n)
    | st.sampled_from([b"NaN", b"1e999", b"9" * 5000, b'{"tasks": [{}]}' * 3, b"\xff\xfe{\x00"])
)


@pytest.fixture
def client(tmp_path: Path, redis: Redis, label_config: LabelConfig) -> FlaskClient:
    publish_tiny_model(tmp_path, label_config)
    fuzz_settings = dataclasses.replace(
        settings_for(tmp_path),
        label_studio_url="http://127.0.0.1:1",  # refused at once
    )
    return create_app(WaferLabelingService(fuzz_settings), basic_auth=None).test_client()


@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[None]:
    yield
    for route in sorted({route for route, _ in COUNTS}):
        print(
            f"fuzz {route}: {COUNTS[route, 'inputs']} inputs, {COUNTS[route, '4xx']} 4xx, "
            f"{COUNTS[route, '5xx']} 5xx (of them 503: {COUNTS[route, '503']})"
        )


def send(
    client: FlaskClient,
    path: str,
    *,
    json: Any = None,
    data: bytes | None = None,
    label: str | None = None,
    allowed_5xx: tuple[int, ...] = (),
) -> int:
    method = "GET" if path == "/versions" else "POST"
    if data is not None:
        response = client.open(path, method=method, data=data, content_type="application/json")
    else:
        response = client.open(path, method=method, json=json)
    status = response.status_code
    COUNTS[label or path, "inputs"] += 1
    COUNTS[label or path, f"{status // 100}xx"] += 1
    if status >= 500:
        COUNTS[label or path, "503"] += status == 503
    assert status < 500 or status in allowed_5xx, (path, status, response.get_data()[:300])
    assert response.is_json
    return status


@FUZZ
@given(body=predict_bodies)
def test_predict_shaped_bodies(client: FlaskClient, body: dict[str, Any]) -> None:
    send(client, "/predict", json=body)


@FUZZ
@given(body=setup_bodies)
def test_setup_shaped_bodies(client: FlaskClient, body: dict[str, Any]) -> None:
    send(client, "/setup", json=body)


@FUZZ
@given(body=webhook_bodies)
def test_webhook_shaped_bodies(client: FlaskClient, body: dict[str, Any]) -> None:
    send(client, "/webhook", json=body)


@FUZZ
@given(body=json_values, path=st.sampled_from(["/predict", "/setup", "/webhook", "/versions"]))
def test_any_json(client: FlaskClient, body: Any, path: str) -> None:
    send(client, path, json=body)


@FUZZ
@given(body=raw_bodies, path=st.sampled_from(["/predict", "/setup", "/webhook", "/versions"]))
def test_any_bytes(client: FlaskClient, body: bytes, path: str) -> None:
    status = send(client, path, data=body)
    if path != "/versions":
        assert status == 400  # no random bytes make a usable request


@settings(max_examples=20, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(body=webhook_bodies)
def test_a_dead_redis_is_503_never_500(tmp_path: Path, body: dict[str, Any]) -> None:
    dead = create_app(
        WaferLabelingService(settings_for(tmp_path, DEAD_REDIS_URL)), basic_auth=None
    ).test_client()
    status = send(dead, "/webhook", json=body, label="/webhook, Redis down", allowed_5xx=(503,))
    assert status in (200, 400, 503)
    response = dead.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 2}})
    assert response.status_code == 503
