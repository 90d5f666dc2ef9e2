"""The real WaferLabelingService behind the HTTP app: a tiny served model, a real Redis (db 15)."""

from __future__ import annotations

import base64
import dataclasses
import http.server
import logging
import os
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import pytest
import torch
from flask.testing import FlaskClient
from redis import Redis
from rq import Queue

from backend import model_store as model_store_module
from backend import service as service_module
from backend.app import MLBackend, create_app
from backend.classifier import WaferClassifier, build_network
from backend.encoding import render_picture
from backend.harness.stack import free_port, running_backend, venv_bin
from backend.images import data_url, png_bytes
from backend.label_config import DEFAULT_LABEL_CONFIG, LabelConfig
from backend.loop_keys import EVENTS_QUEUE, TRAINING_QUEUE
from backend.model_card import ModelCard
from backend.model_store import ModelStore
from backend.service import NO_MODEL, WaferLabelingService
from backend.settings import REPO_ROOT, Settings
from model import WaferMapModel
from tests.conftest import TEST_REDIS_URL

REDIS_URL = TEST_REDIS_URL
DEAD_REDIS_URL = "redis://127.0.0.1:1/0"
VERSION = "v001-set0"
SIZE = 16
USER, PASSWORD = "labeler", "s3cret-pass"
ENGINEER = 7
PROJECT = 2


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


def publish_tiny_model(
    model_dir: Path,
    labels: LabelConfig,
    project: int = PROJECT,
    version: str = VERSION,
    seed: int = 0,
) -> ModelCard:
    """A random resnet18 as `version` of `project` (served at once)."""
    store = ModelStore.for_project(model_dir, project, torch.device("cpu"))
    n = len(labels.failure_types)
    card = ModelCard(
        version=version,
        failure_types=labels.failure_types,
        image_size=SIZE,
        backbone="resnet18",
        logit_adjustment=(0.0,) * n,
        trained_through_set=0,
        metrics={"route_threshold": 0.5, "validation_accuracy": 0.9},
    )
    network = build_network("resnet18", n, seed=seed)
    store.publish(WaferClassifier(network=network, card=card, device=torch.device("cpu")))
    return card


@pytest.fixture(autouse=True)
def patient_health(monkeypatch: pytest.MonkeyPatch) -> None:
    """/health waits for its look at the stores here (a loaded test machine may take longer
    than the 0.7 s it waits in production); `test_health_never_waits_for_a_slow_store` checks
    the production behaviour."""
    monkeypatch.setattr(service_module, "HEALTH_WAIT_S", 60.0)


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
        "projects": {"2": VERSION},
        "problems": [],
    }


def test_setup_with_the_projects_config(client: FlaskClient) -> None:
    body = {"project": "2.1700000000", "schema": DEFAULT_LABEL_CONFIG.read_text()}
    response = client.post("/setup", json=body)
    assert response.status_code == 200
    assert response.json == {"model_version": VERSION}


def test_setup_refuses_a_config_lacking_a_failure_type(client: FlaskClient) -> None:
    xml = DEFAULT_LABEL_CONFIG.read_text()
    schema = re.sub(r'<Choice value="Scratch"[^>]*/>', "", xml)
    assert schema != xml
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


def test_tasks_of_sets_not_opened_yet_get_no_prediction(client: FlaskClient) -> None:
    """The served model learnt through set 0, so set 1 is the open set: a task of set 3 that an
    engineer opens early gets an entry without a result (Label Studio stores nothing), so it
    never carries an old model's prediction beside the one its set gets when it is opened."""
    early = picture_task(21, 4)
    early["data"]["set"] = 3
    unnumbered = picture_task(22, 5)
    del unnumbered["data"]["set"]
    tasks = [picture_task(20, 1), early, unnumbered]
    results = body_of(client.post("/predict", json=predict_body(tasks)))["results"]
    assert [("result" in r) for r in results] == [True, False, True]
    assert results[1]["model_version"] == VERSION
    assert "set 3 is pre-annotated when it is opened" in results[1]["error"]
    assert "learnt through set 0" in results[1]["error"]


def test_predict_without_a_model(tmp_path: Path, redis: Redis) -> None:
    client = app_client(settings_for(tmp_path / "empty"))
    assert client.get("/health").json == {
        "status": "UP",
        "model_class": "WaferLabelingService",
        "projects": {},
        "problems": [],
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
    assert queue.jobs[0].args == (2, True)
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
    metrics = client.get("/metrics.json")
    assert metrics.status_code == 200
    assert "Redis" in body_of(metrics)["queues"]["error"]


def test_metrics_lists_the_versions(client: FlaskClient, redis: Redis) -> None:
    client.post("/webhook", json={"action": "TASKS_CREATED", "project": {"id": 2}})
    response = client.get("/metrics.json")
    assert response.status_code == 200
    body = body_of(response)
    assert body["projects"]["2"]["model_version"] == VERSION
    [version] = body["projects"]["2"]["versions"]
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
    assert model.model_version("2.1700000000") == VERSION
    assert model.setup("2", DEFAULT_LABEL_CONFIG.read_text(), {}) == VERSION
    assert model.setup("3", DEFAULT_LABEL_CONFIG.read_text(), {}) == NO_MODEL
    [entry] = model.predict([picture_task(1, 4)], None, "2.1700000000")
    assert entry["model_version"] == VERSION
    assert entry["result"][0]["value"]["choices"][0] in label_config.failure_types
    assert model.fit("START_TRAINING", {"project": {"id": 3}}) == {
        "status": "queued",
        "action": "START_TRAINING",
        "project": 3,
    }
    queue = Queue(EVENTS_QUEUE, connection=redis)
    assert queue.count == 1
    assert queue.jobs[0].args == (3, False)
    assert model.webhook({"action": "TASKS_CREATED", "project": 3})["status"] == "already queued"
    assert model.metrics()["projects"]["2"]["versions"][0]["version"] == VERSION
    assert model.versions("2") == [VERSION]
    # Project 3 has no model directory: asking about it opened nothing to report.
    assert model.health()["projects"] == {"2": VERSION}
    assert list(model.service._stores) == [2]


# ---- one model per project, /versions, store problems ----------------------------------------


def test_each_project_is_served_its_own_model(
    model_dir: Path, redis: Redis, label_config: LabelConfig
) -> None:
    publish_tiny_model(model_dir, label_config, project=5, version="v001-other", seed=1)
    client = app_client(settings_for(model_dir))
    schema = DEFAULT_LABEL_CONFIG.read_text()
    for project, version in (("2.1700000000", VERSION), ("5.1700000001", "v001-other")):
        assert body_of(client.post("/setup", json={"project": project, "schema": schema})) == {
            "model_version": version
        }
        body = {**predict_body([picture_task(1, 1)]), "project": project}
        [entry] = body_of(client.post("/predict", json=body))["results"]
        assert entry["model_version"] == version and entry["result"]
        versions = client.open("/versions", method="GET", json={"project": project})
        assert body_of(versions) == {"versions": [version]}
    # A project without a model of its own gets none of the others'.
    setup = client.post("/setup", json={"project": "7.1700000002", "schema": schema})
    assert body_of(setup) == {"model_version": NO_MODEL}
    [entry] = body_of(
        client.post("/predict", json={**predict_body([picture_task(1, 1)]), "project": "7.1"})
    )["results"]
    assert "result" not in entry and "project 7" in entry["error"]
    assert body_of(client.get("/versions?project=7")) == {"versions": [NO_MODEL]}
    health = body_of(client.get("/health"))
    assert health["projects"] == {"2": VERSION, "5": "v001-other"}


@pytest.mark.parametrize("project", ["x.1", "0.5", "-3", "99999999999999999999", "", "1e3"])
def test_requests_for_no_usable_project_are_a_400(client: FlaskClient, project: str) -> None:
    body = {**predict_body([picture_task(1, 1)]), "project": project}
    response = client.post("/predict", json=body)
    assert response.status_code == 400, project
    assert "project" in body_of(response)["error"]


def test_a_bad_model_card_breaks_no_route(model_dir: Path, redis: Redis) -> None:
    """The review's `card.json = {}`: /metrics answered 500 KeyError."""
    store = ModelStore.for_project(model_dir, PROJECT, torch.device("cpu"))
    store.card_path_of(VERSION).write_text("{}")
    client = app_client(settings_for(model_dir))
    metrics = client.get("/metrics.json")
    assert metrics.status_code == 200
    [version] = body_of(metrics)["projects"]["2"]["versions"]
    assert version["version"] == VERSION  # read from the weights instead, or an error entry
    assert "backbone" in version or "error" in version
    assert client.get("/versions?project=2").status_code == 200
    assert client.get("/health").status_code == 200
    # Card and weights both unreadable: listed as unreadable, still no 500.
    store.path_of(VERSION).write_bytes(b"not a checkpoint")
    metrics = client.get("/metrics.json")
    assert metrics.status_code == 200
    [version] = body_of(metrics)["projects"]["2"]["versions"]
    assert version["version"] == VERSION and "error" in version
    assert str(model_dir) not in metrics.get_data(as_text=True)
    health = client.get("/health")
    assert health.status_code == 200
    assert body_of(health)["problems"]


def test_health_reports_a_current_that_cannot_be_served(model_dir: Path, redis: Redis) -> None:
    store = ModelStore.for_project(model_dir, PROJECT, torch.device("cpu"))
    (store.root / "CURRENT").write_text("../../etc/passwd\n")
    client = app_client(settings_for(model_dir))
    health = client.get("/health")
    assert health.status_code == 200
    [problem] = body_of(health)["problems"]
    assert problem.startswith("project 2:")
    assert "/etc/passwd" not in health.get_data(as_text=True).replace("../../etc/passwd", "")


# ---- bounded requests against the real service -----------------------------------------------


def test_failed_tasks_are_summarised_in_one_log_line(
    client: FlaskClient, caplog: pytest.LogCaptureFixture
) -> None:
    bad = [{"id": i, "data": {"image": "data:image/png;base64,AAAA"}} for i in range(50)]
    with caplog.at_level(logging.DEBUG, logger="backend"):
        response = client.post("/predict", json=predict_body([*bad, picture_task(99, 1)]))
    results = body_of(response)["results"]
    assert len(results) == 51 and "result" in results[-1]
    failures = [r for r in caplog.records if "tasks failed" in r.getMessage()]
    [line] = failures
    assert "50 of 51 tasks failed: task 0:" in line.getMessage()
    assert "(and 47 more)" in line.getMessage()
    assert len([r for r in caplog.records if r.name.startswith("backend.service")]) == 1


def test_huge_requests_stay_bounded(client: FlaskClient, caplog: pytest.LogCaptureFixture) -> None:
    """The review's 4 MiB of {"tasks":[{},{},...]} (59 s, +1.1 GB, 112 MiB answer, 1.4 M log
    lines): now refused by the task cap; a batch of empty tasks under the cap gets one small
    error entry each and one log line."""
    huge = b'{"tasks":[' + b",".join([b"{}"] * (4 * 2**20 // 3)) + b'], "project": "2.1"}'
    with caplog.at_level(logging.DEBUG):
        refused = client.post("/predict", data=huge, content_type="application/json")
        assert refused.status_code == 400
        assert "too many tasks" in body_of(refused)["error"]
        assert len(refused.get_data()) < 300
        under_cap = {"tasks": [{}] * 20_000, "project": "2.1"}
        answered = client.post("/predict", json=under_cap)
    assert answered.status_code == 200
    results = body_of(answered)["results"]
    assert len(results) == 20_000 and all("error" in r for r in results)
    assert len(answered.get_data()) < 200 * 20_000
    assert len(caplog.records) <= 3


# ---- served by a real gunicorn ---------------------------------------------------------------


class _SlowPictures(http.server.BaseHTTPRequestHandler):
    """Label Studio's upload URLs, answered after a pause (a slow Label Studio on loopback)."""

    picture = png_bytes(render_picture(die_map(5)))
    served = 0
    pause = 2.0

    def do_GET(self) -> None:
        type(self).served += 1
        time.sleep(self.pause)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(self.picture)))
        self.end_headers()
        self.wfile.write(self.picture)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.mark.slow
def test_health_answers_within_label_studios_second_while_predictions_run(
    model_dir: Path, redis: Redis, tmp_path: Path
) -> None:
    """Label Studio marks a backend disconnected when /health takes over 1 s: with more
    /predict calls in flight than the backend takes (each waiting on slow pictures), /health
    must still answer within that second."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowPictures)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {
        "MODEL_DIR": str(model_dir),
        "REDIS_URL": REDIS_URL,
        "LABEL_STUDIO_URL": f"http://127.0.0.1:{server.server_address[1]}",
        "LABEL_STUDIO_API_KEY": "",
        "WAFER_DEVICE": "cpu",
        "WAFER_BACKBONE": "resnet18",
    }
    task = {"id": 1, "data": {"image": "/data/upload/2/wafer.png"}, "project": PROJECT}
    statuses: list[int] = []
    try:
        with running_backend(env, free_port(), tmp_path / "backend.log") as url:

            def post() -> None:
                body = predict_body([task, {**task, "id": 2}])
                statuses.append(httpx.post(f"{url}/predict", json=body, timeout=120).status_code)

            callers = [threading.Thread(target=post) for _ in range(24)]
            for caller in callers:
                caller.start()
            deadline = time.monotonic() + 60
            while _SlowPictures.served < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert _SlowPictures.served >= 2, "no prediction reached the picture server"
            for _ in range(10):
                health = httpx.get(f"{url}/health", timeout=1.0)  # Label Studio's own limit
                assert health.status_code == 200
                assert health.json()["projects"] == {"2": VERSION}
                time.sleep(0.2)
            assert any(caller.is_alive() for caller in callers)  # still predicting meanwhile
            for caller in callers:
                caller.join(120)
    finally:
        server.shutdown()
    assert len(statuses) == 24
    assert set(statuses) <= {200, 503}
    assert statuses.count(200) >= 2  # at most WAFER_PREDICT_REQUESTS (20) taken, none lost


def test_gunicorn_refuses_an_open_backend_on_other_addresses(tmp_path: Path) -> None:
    """Without credentials the backend serves loopback only (gunicorn.conf.py checks before
    any socket is opened), and too few threads for the /predict budget are refused."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASIC_AUTH_")}
    gunicorn = [str(venv_bin("gunicorn")), "--config", str(REPO_ROOT / "gunicorn.conf.py")]
    for extra, message in (
        (["--bind", "0.0.0.0:9"], "refusing to serve 0.0.0.0:9 without credentials"),
        (["--bind", f"127.0.0.1:{free_port()}", "--threads", "4"], "must be more than"),
    ):
        done = subprocess.run(
            [*gunicorn, *extra, "_wsgi:app"],
            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode != 0
        assert message in done.stderr


def test_the_docker_image_requires_credentials() -> None:
    """The image sets WAFER_REQUIRE_AUTH and compose refuses to start without credentials."""
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert "WAFER_REQUIRE_AUTH=true" in dockerfile
    compose = (REPO_ROOT / "docker-compose.yml").read_text()
    assert "BASIC_AUTH_USER: ${BASIC_AUTH_USER:?" in compose
    assert "BASIC_AUTH_PASS: ${BASIC_AUTH_PASS:?" in compose
    settings = Settings.from_env({"WAFER_REQUIRE_AUTH": "true"})
    with pytest.raises(ValueError, match="BASIC_AUTH_USER and BASIC_AUTH_PASS"):
        create_app(
            WaferLabelingService(settings),
            basic_auth=settings.basic_auth,
            require_auth=settings.require_auth,
        )


@pytest.mark.slow
def test_the_load_test_runs_and_prints_its_figures(capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m backend load-test` with 2 clients for 2 s (the figures are not judged)."""
    from backend.cli import main

    code = main(["load-test", "--clients", "2", "--seconds", "2", "--batch", "5"])
    out = capsys.readouterr().out
    assert code == 0
    for figure in ("p50 ", "p99 ", "wafers/s", "RSS: ", "/health: slowest"):
        assert figure in out
    assert re.search(r"by status \{200: \d+\}", out), out


def test_health_never_waits_for_a_slow_store(
    model_dir: Path, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow disk may make the look at the stores take longer than Label Studio's 1 s:
    /health then answers with the previous look instead of waiting."""
    monkeypatch.setattr(service_module, "HEALTH_WAIT_S", 0.2)
    service = WaferLabelingService(settings_for(model_dir))
    client = create_app(service, basic_auth=None).test_client()
    loading, finished = threading.Event(), threading.Event()
    real = service_module.served_by_card

    def slow_served_by_card(store: ModelStore) -> tuple[str | None, list[str]]:
        loading.set()
        finished.wait(30)  # until the test has its answer
        return real(store)

    monkeypatch.setattr(service_module, "served_by_card", slow_served_by_card)
    answer = client.get("/health")
    assert loading.is_set() and not finished.is_set()  # answered while the look still ran
    assert answer.status_code == 200
    assert body_of(answer)["status"] == "UP"
    finished.set()


# ---- the model cache: only /setup and /predict of a known project open a store ----------------


def test_only_setup_and_predict_of_a_known_project_load_its_model(
    model_dir: Path, redis: Redis, monkeypatch: pytest.MonkeyPatch, label_config: LabelConfig
) -> None:
    """With more projects than MAX_OPEN_STORES, /health, /metrics and /versions loaded every
    project's weights on each call (and ids of no project took a place in the cache)."""
    monkeypatch.setattr(service_module, "MAX_OPEN_STORES", 2)
    for project in (3, 4, 5):
        publish_tiny_model(model_dir, label_config, project=project, version=f"v001-p{project}")
    loads: list[Path] = []
    real_load = model_store_module.load_version

    def counted(path: Path, device: torch.device) -> WaferClassifier:
        loads.append(path)
        return real_load(path, device)

    monkeypatch.setattr(model_store_module, "load_version", counted)
    service = WaferLabelingService(settings_for(model_dir))
    client = create_app(service, basic_auth=None).test_client()
    for _ in range(3):
        health = body_of(client.get("/health"))
        assert health["projects"] == {"2": VERSION, "3": "v001-p3", "4": "v001-p4", "5": "v001-p5"}
        metrics = body_of(client.get("/metrics.json"))
        assert metrics["projects"]["4"]["model_version"] == "v001-p4"
        for asked in ("2", "5", "77", "999999999"):
            assert client.get(f"/versions?project={asked}").status_code == 200
    assert body_of(client.get("/versions?project=77")) == {"versions": [NO_MODEL]}
    setup = {"project": "77.1700000000", "schema": DEFAULT_LABEL_CONFIG.read_text()}
    assert body_of(client.post("/setup", json=setup)) == {"model_version": NO_MODEL}
    assert loads == [] and not service._stores
    body = {**predict_body([picture_task(1, 1)]), "project": "3.1"}
    [entry] = body_of(client.post("/predict", json=body))["results"]
    assert entry["model_version"] == "v001-p3"
    assert [p.name for p in loads] == ["v001-p3.pt"] and list(service._stores) == [3]


def test_health_sees_a_damaged_current_without_loading(model_dir: Path, redis: Redis) -> None:
    """A CURRENT naming a version whose weights are gone: the newest readable version is
    reported as served, with the problem, as the store itself would serve it."""
    store = ModelStore.for_project(model_dir, PROJECT, torch.device("cpu"))
    (store.root / "CURRENT").write_text("v009-gone\n")
    client = app_client(settings_for(model_dir))
    health = body_of(client.get("/health"))
    assert health["projects"] == {"2": VERSION}
    assert health["problems"] == [
        f"project 2: model version v009-gone named in CURRENT does not exist; serving {VERSION} "
        "instead"
    ]
    [entry] = body_of(client.post("/predict", json=predict_body([picture_task(1, 1)])))["results"]
    assert entry["model_version"] == VERSION  # what the store serves agrees


def test_a_fifo_for_current_blocks_no_health_or_metrics(model_dir: Path, redis: Redis) -> None:
    """Reading CURRENT as a FIFO would block the reader for good (and /metrics with it)."""
    store = ModelStore.for_project(model_dir, PROJECT, torch.device("cpu"))
    (store.root / "CURRENT").unlink()
    os.mkfifo(store.root / "CURRENT")
    client = app_client(settings_for(model_dir))
    metrics = body_of(client.get("/metrics.json"))["projects"]["2"]
    assert metrics["model_version"] == VERSION  # the newest readable version
    assert "FIFO" in metrics["problems"][0] and str(model_dir) not in str(metrics)
    health = body_of(client.get("/health"))
    assert health["projects"] == {"2": VERSION} and "FIFO" in health["problems"][0]
