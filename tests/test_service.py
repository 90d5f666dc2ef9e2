"""The real WaferLabelingService behind the HTTP app: a tiny served model, a real Redis (db 15)."""

from __future__ import annotations

import base64
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
from flask.testing import FlaskClient
from redis import Redis
from rq import Queue

from backend.app import MLBackend, create_app
from backend.classifier import ModelCard, WaferClassifier, build_network
from backend.encoding import render_picture
from backend.images import data_url, png_bytes
from backend.jobs import EVENTS_QUEUE, TRAINING_QUEUE
from backend.label_config import DEFAULT_LABEL_CONFIG, LabelConfig
from backend.model_store import ModelStore
from backend.service import NO_MODEL, WaferLabelingService
from backend.settings import Settings
from model import WaferMapModel
from tests.conftest import TEST_REDIS_URL

REDIS_URL = TEST_REDIS_URL
DEAD_REDIS_URL = "redis://127.0.0.1:1/0"
VERSION = "v001-set0"
SIZE = 16
USER, PASSWORD = "labeler", "s3cret-pass"
ENGINEER = 7


def settings_for(model_dir: Path, redis_url: str = REDIS_URL) -> Settings:
    return dataclasses.replace(
        Settings(),
        model_dir=model_dir,
        redis_url=redis_url,
        label_studio_api_key="",
        device="cpu",
        backbone="resnet18",
        image_size=SIZE,
    )


def publish_tiny_model(model_dir: Path, labels: LabelConfig) -> ModelCard:
    store = ModelStore(model_dir, torch.device("cpu"))
    n = len(labels.failure_types)
    card = ModelCard(
        version=VERSION,
        failure_types=labels.failure_types,
        image_size=SIZE,
        backbone="resnet18",
        logit_adjustment=(0.0,) * n,
        training={"trained_through_set": 0},
        metrics={"route_threshold": 0.5, "validation_accuracy": 0.9},
    )
    network = build_network("resnet18", n, seed=0)
    store.publish(WaferClassifier(network=network, card=card, device=torch.device("cpu")))
    return card


@pytest.fixture
def model_dir(tmp_path: Path, label_config: LabelConfig) -> Path:
    publish_tiny_model(tmp_path, label_config)
    return tmp_path


def app_client(settings: Settings, basic_auth: tuple[str, str] | None = None) -> FlaskClient:
    service: MLBackend = WaferLabelingService(settings)
    return create_app(service, basic_auth=basic_auth).test_client()


@pytest.fixture
def client(model_dir: Path, redis: Redis) -> FlaskClient:
    return app_client(settings_for(model_dir))


def die_map(seed: int) -> npt.NDArray[np.uint8]:
    """A round wafer of 20 x 20 dies with a few failing ones."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:20, :20]
    on_wafer = (y - 9.5) ** 2 + (x - 9.5) ** 2 <= 100
    codes = np.where(on_wafer, 1, 0).astype(np.uint8)
    codes[on_wafer & (rng.random((20, 20)) < 0.2)] = 2
    return codes


def picture_task(task_id: int, seed: int) -> dict[str, Any]:
    image = data_url(png_bytes(render_picture(die_map(seed))))
    return {"id": task_id, "data": {"image": image, "set": 1}, "project": 2}


def predict_body(tasks: list[dict[str, Any]]) -> dict[str, Any]:
    return {"tasks": tasks, "project": "2.1700000000", "params": {"context": None}}


def body_of(response: Any) -> dict[str, Any]:
    """The JSON object of a test-client response."""
    body = response.get_json()
    assert isinstance(body, dict), response.get_data(as_text=True)
    return body


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def test_health_reports_the_served_version(client: FlaskClient) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json == {
        "status": "UP",
        "model_class": "WaferLabelingService",
        "model_version": VERSION,
    }


def test_setup_with_the_projects_config(client: FlaskClient) -> None:
    body = {"project": "2.1700000000", "schema": DEFAULT_LABEL_CONFIG.read_text()}
    response = client.post("/setup", json=body)
    assert response.status_code == 200
    assert response.json == {"model_version": VERSION}


def test_setup_refuses_a_config_lacking_a_failure_type(client: FlaskClient) -> None:
    xml = DEFAULT_LABEL_CONFIG.read_text()
    assert '<Choice value="Scratch"/>' in xml
    schema = xml.replace('<Choice value="Scratch"/>', "")
    response = client.post("/setup", json={"project": "2", "schema": schema})
    assert response.status_code == 400
    assert "Scratch" in body_of(response)["error"]
    broken = client.post("/setup", json={"project": "2", "schema": "<View><Choices"})
    assert broken.status_code == 400
    assert "labeling config" in body_of(broken)["error"]


def test_predict_answers_every_task_in_order(
    client: FlaskClient, label_config: LabelConfig
) -> None:
    tasks = [picture_task(11, 1), picture_task(12, 2)]
    tasks.append({"id": 13, "data": {"image": "data:image/png;base64,AAAAAAAA"}, "project": 2})
    tasks.append(picture_task(14, 3))
    response = client.post("/predict", json=predict_body(tasks))
    assert response.status_code == 200
    results = body_of(response)["results"]
    assert len(results) == 4
    for i in (0, 1, 3):
        entry = results[i]
        assert entry["model_version"] == VERSION
        assert 0.0 < entry["score"] <= 1.0
        assert "error" not in entry
        [item] = entry["result"]
        assert item["from_name"] == label_config.from_name
        assert item["to_name"] == label_config.to_name
        [choice] = item["value"]["choices"]
        assert choice in label_config.failure_types
    broken = results[2]
    assert "result" not in broken
    assert broken["model_version"] == VERSION
    assert "task 13" in broken["error"]


def test_predict_without_a_model(tmp_path: Path, redis: Redis) -> None:
    client = app_client(settings_for(tmp_path / "empty"))
    assert client.get("/health").json == {
        "status": "UP",
        "model_class": "WaferLabelingService",
        "model_version": NO_MODEL,
    }
    tasks = [picture_task(1, 1), picture_task(2, 2)]
    response = client.post("/predict", json=predict_body(tasks))
    assert response.status_code == 200
    results = body_of(response)["results"]
    assert len(results) == 2
    for entry in results:
        assert entry["model_version"] == "no-model-yet"
        assert "result" not in entry
        assert entry["error"]


def test_webhook_queues_a_persons_annotation(client: FlaskClient, redis: Redis) -> None:
    payload = {
        "action": "ANNOTATION_CREATED",
        "project": {"id": 2},
        "annotation": {"id": 5, "completed_by": ENGINEER, "result": []},
    }
    response = client.post("/webhook", json=payload)
    assert response.status_code == 200
    assert response.json == {"status": "queued", "action": "ANNOTATION_CREATED", "project": 2}
    queue = Queue(EVENTS_QUEUE, connection=redis)
    assert queue.count == 1
    assert queue.jobs[0].args == (2,)
    again = client.post("/webhook", json=payload)
    assert body_of(again)["status"] == "already queued"
    assert queue.count == 1
    assert Queue(TRAINING_QUEUE, connection=redis).count == 0


def test_malformed_webhook_is_a_bad_request(client: FlaskClient, redis: Redis) -> None:
    response = client.post("/webhook", json={"action": "ANNOTATION_CREATED"})
    assert response.status_code == 400
    assert "project" in body_of(response)["error"]
    assert client.post("/webhook", json={"project": 2}).status_code == 400
    assert redis.dbsize() == 0


def test_webhook_with_a_dead_redis_is_503(model_dir: Path) -> None:
    client = app_client(settings_for(model_dir, DEAD_REDIS_URL))
    response = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 2}})
    assert response.status_code == 503
    assert "Redis" in body_of(response)["error"]
    # The rest of the backend still answers.
    assert client.get("/health").status_code == 200
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert "Redis" in body_of(metrics)["queues"]["error"]


def test_metrics_lists_the_versions(client: FlaskClient, redis: Redis) -> None:
    client.post("/webhook", json={"action": "TASKS_CREATED", "project": {"id": 2}})
    response = client.get("/metrics")
    assert response.status_code == 200
    body = body_of(response)
    assert body["model_version"] == VERSION
    [version] = body["versions"]
    assert version["version"] == VERSION
    assert version["backbone"] == "resnet18"
    assert version["image_size"] == SIZE
    assert version["trained_through_set"] == 0
    assert version["metrics"] == {"route_threshold": 0.5, "validation_accuracy": 0.9}
    assert body["queues"] == {EVENTS_QUEUE: 1, TRAINING_QUEUE: 0}


def test_basic_auth_guards_everything_but_health(model_dir: Path, redis: Redis) -> None:
    client = app_client(settings_for(model_dir), basic_auth=(USER, PASSWORD))
    body = predict_body([picture_task(1, 1)])
    refused = client.post("/predict", json=body)
    assert refused.status_code == 401
    assert refused.headers["WWW-Authenticate"].startswith("Basic")
    assert client.post("/predict", json=body, headers=basic(USER, "wrong")).status_code == 401
    assert client.post("/webhook", json={"action": "TASKS_CREATED"}).status_code == 401
    assert client.get("/health").status_code == 200
    allowed = client.post("/predict", json=body, headers=basic(USER, PASSWORD))
    assert allowed.status_code == 200
    assert body_of(allowed)["results"][0]["model_version"] == VERSION
    assert redis.dbsize() == 0


def test_top_level_model_class(model_dir: Path, redis: Redis, label_config: LabelConfig) -> None:
    model = WaferMapModel(settings_for(model_dir))
    assert model.model_version() == VERSION
    assert model.setup("3", DEFAULT_LABEL_CONFIG.read_text(), {}) == VERSION
    [entry] = model.predict([picture_task(1, 4)])
    assert entry["model_version"] == VERSION
    assert entry["result"][0]["value"]["choices"][0] in label_config.failure_types
    assert model.fit("START_TRAINING", {"project": {"id": 3}}) == {
        "status": "queued",
        "action": "START_TRAINING",
        "project": 3,
    }
    queue = Queue(EVENTS_QUEUE, connection=redis)
    assert queue.count == 1
    assert queue.jobs[0].args == (3,)
    assert model.webhook({"action": "TASKS_CREATED", "project": 3})["status"] == "already queued"
    assert model.metrics()["versions"][0]["version"] == VERSION
