"""The whole loop against the real parts: Label Studio 1.23.2, Redis, an rq worker, gunicorn.

A small WM-811K subsample (an initial labelled set and two sets) goes through the product as a
user runs it: the set-up command wires the project (basic auth on, webhook with credentials),
the initial set is imported with its labels, the worker trains the first model and opens set 1
(predictions, uncertainty in the task data, confident wafers accepted), a second user labels
the uncertain wafers through the SDK, exactly one retraining runs, and set 2 is opened by the
new model.
"""

from __future__ import annotations

import dataclasses
import secrets
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import torch
from redis import Redis
from rq import Queue
from rq.job import Job, JobStatus

from backend.engineers import label_uncertain, set_outcome, wait_until_idle
from backend.jobs import QUEUES, TRAINING_QUEUE, WORKER_CLASS, retrain_job_id
from backend.label_config import LabelConfig
from backend.labelstudio import LabelStudioClient
from backend.model_store import ModelStore
from backend.ops import ENGINEER_VIEW, wire_project
from backend.settings import Settings
from backend.stack import (
    Credentials,
    LabelStudioServer,
    create_user,
    free_port,
    running_backend,
    running_worker,
    wait_for_worker,
)
from backend.wafer_sets import SetPlan, import_sets, plan_sets
from backend.wafers import WaferMaps
from tests.conftest import E2E_REDIS_URL

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REDIS_URL = E2E_REDIS_URL
AUTH = ("fab-backend", secrets.token_urlsafe(12))
LOOP_TIMEOUT_S = 900


@dataclass
class Loop:
    server: LabelStudioServer
    project: int
    plan: SetPlan
    auto: Credentials
    engineer: Credentials
    backend_url: str
    store: ModelStore
    redis: Redis
    truth: dict[int, str]


def _version_of(task: dict[str, Any], version: str) -> list[dict[str, Any]]:
    return [p for p in task.get("predictions") or [] if p.get("model_version") == version]


@pytest.fixture(scope="module")
def loop(
    label_studio: LabelStudioServer,
    real_wafers: tuple[WaferMaps, Any],
    label_config: LabelConfig,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Loop]:
    redis = Redis.from_url(REDIS_URL)
    redis.flushdb()
    work = tmp_path_factory.mktemp("loop")
    tag = uuid.uuid4().hex[:8]
    auto = create_user(label_studio, f"auto-{tag}@example.com", secrets.token_urlsafe(12))
    engineer = create_user(label_studio, f"engineer-{tag}@example.com", secrets.token_urlsafe(12))
    env = {
        "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": auto.token,
        "REDIS_URL": REDIS_URL,
        "MODEL_DIR": str(work / "models"),
        "BASIC_AUTH_USER": AUTH[0],
        "BASIC_AUTH_PASS": AUTH[1],
        "WAFER_BACKBONE": "resnet18",
        "WAFER_IMAGE_SIZE": "32",
        "WAFER_EPOCHS": "6",
        "WAFER_DEVICE": "cpu",
        # A fixed threshold: calibration on a few dozen held-out wafers would (rightly) send
        # every wafer to engineers, and this test must see both routes.
        "WAFER_ROUTE_MEASURE": "least-confidence",
        "WAFER_ROUTE_THRESHOLD": "0.3",
    }
    plan = plan_sets(real_wafers[0], subsample=0.004, initial_fraction=0.5, n_sets=2, seed=3)
    truth = {
        int(plan.wafers.source_row[i]): plan.wafers.classes[int(plan.wafers.labels[i])]
        for i in range(len(plan.wafers))
    }
    settings = dataclasses.replace(
        Settings.from_env(env), label_config_path=Settings().label_config_path
    )
    with (
        running_backend(env, free_port(), work / "backend.log") as backend_url,
        running_worker(
            env, REDIS_URL, QUEUES, work / "worker.log", worker_class=WORKER_CLASS
        ) as worker,
    ):
        wait_for_worker(REDIS_URL, QUEUES, timeout=60, pid=worker.pid)
        with LabelStudioClient.connect(label_studio.url, label_studio.api_key) as admin:
            wiring = wire_project(admin, settings, f"loop {tag}", backend_url)
        with LabelStudioClient.connect(label_studio.url, auto.token) as client:
            import_sets(client, wiring.project, plan, label_config)
        wait_until_idle(redis, wiring.project, LOOP_TIMEOUT_S)
        yield Loop(
            server=label_studio,
            project=wiring.project,
            plan=plan,
            auto=auto,
            engineer=engineer,
            backend_url=backend_url,
            store=ModelStore.for_project(work / "models", wiring.project, torch.device("cpu")),
            redis=redis,
            truth=truth,
        )
    redis.flushdb()


@pytest.fixture(scope="module")
def backend_client(loop: Loop) -> Iterator[LabelStudioClient]:
    with LabelStudioClient.connect(loop.server.url, loop.auto.token) as client:
        yield client


def test_the_backend_refuses_calls_without_credentials(loop: Loop) -> None:
    assert httpx.get(f"{loop.backend_url}/health").status_code == 200
    answer = httpx.post(f"{loop.backend_url}/webhook", json={"action": "START_TRAINING"})
    assert answer.status_code == 401


def test_the_webhook_carries_the_backend_credentials(loop: Loop, ls: LabelStudioClient) -> None:
    hooks = [h for h in ls.webhooks(loop.project) if h["url"] == f"{loop.backend_url}/webhook"]
    assert len(hooks) == 1
    assert hooks[0]["headers"]["Authorization"].startswith("Basic ")


def test_set_1_is_pre_annotated_and_its_confident_wafers_accepted(
    loop: Loop, backend_client: LabelStudioClient, label_config: LabelConfig
) -> None:
    first = loop.store.current_version()
    assert first is not None and first.endswith("set0")
    assert backend_client.project_model_version(loop.project) == first
    auto_user = backend_client.current_user_id()
    tasks = backend_client.tasks_of_set(loop.project, 1)
    assert len(tasks) == len(loop.plan.members(1))
    routes = {"auto": 0, "engineer": 0}
    for task in tasks:
        ours = _version_of(task, first)
        assert len(ours) == 1, f"task {task['id']} has {len(ours)} predictions of {first}"
        assert 0.0 < ours[0]["score"] <= 1.0
        data = task["data"]
        assert {"least_confidence", "margin", "entropy", "route", "predicted"} <= set(data)
        choice = ours[0]["result"][0]["value"]["choices"][0]
        assert choice == data["predicted"] and choice in label_config.failure_types
        routes[data["route"]] += 1
        annotations = task["annotations"]
        if data["route"] == "auto":
            assert data["least_confidence"] <= 0.3
            assert len(annotations) == 1
            assert annotations[0]["completed_by"] == auto_user
            assert annotations[0]["parent_prediction"] == ours[0]["id"]
        else:
            assert data["least_confidence"] > 0.3
            assert annotations == []
    assert routes["auto"] > 0 and routes["engineer"] > 0, routes
    # Set 2 waits for the model that set 1 trains.
    assert all(not t["predictions"] for t in backend_client.tasks_of_set(loop.project, 2))


def test_the_engineer_queue_lists_the_uncertain_wafers_most_uncertain_first(
    loop: Loop, ls: LabelStudioClient
) -> None:
    views = {v: i for v, i in _views(ls, loop.project).items()}
    tasks = ls.tasks(loop.project, view=views[ENGINEER_VIEW])
    assert tasks and all(t["data"]["route"] == "engineer" for t in tasks)
    assert all(t["total_annotations"] == 0 for t in tasks)
    # The test routes by least confidence, so that is the order (most uncertain first).
    scores = [t["data"]["least_confidence"] for t in tasks]
    assert scores == sorted(scores, reverse=True)


def _views(ls: LabelStudioClient, project: int) -> dict[str, int]:
    found = ls._sdk.views.list(project=project)
    return {str((v.data or {}).get("title")): int(v.id) for v in found if v.id is not None}


def test_labelling_set_1_retrains_once_and_opens_set_2(
    loop: Loop, backend_client: LabelStudioClient, label_config: LabelConfig
) -> None:
    first = loop.store.current_version()
    with LabelStudioClient.connect(loop.server.url, loop.engineer.token) as person:
        # Engineers' labels fire webhooks; START_TRAINING pressed twice at the same time on top.
        labelled = label_uncertain(person, loop.project, 1, loop.truth, label_config)
        assert labelled > 0
        press = threading.Thread(target=_start_training, args=(loop,))
        press.start()
        _start_training(loop)
        press.join()
    wait_until_idle(loop.redis, loop.project, LOOP_TIMEOUT_S)

    versions = loop.store.versions()
    assert len(versions) == 2 and versions[0] == first, versions
    second = loop.store.current_version()
    assert second == versions[1] and second.endswith("set1")
    job = Job.fetch(retrain_job_id(loop.project, 1), connection=loop.redis)
    assert job.get_status() == JobStatus.FINISHED
    assert Queue(TRAINING_QUEUE, connection=loop.redis).count == 0
    assert loop.store.card(second).training["trained_through_set"] == 1

    assert backend_client.project_model_version(loop.project) == second
    auto_user = backend_client.current_user_id()
    tasks = backend_client.tasks_of_set(loop.project, 2)
    accepted = 0
    for task in tasks:
        ours = _version_of(task, second)
        assert len(ours) == 1 and task["data"]["model_version"] == second
        if task["data"]["route"] == "auto":
            accepted += 1
            assert [a["completed_by"] for a in task["annotations"]] == [auto_user]
            assert task["annotations"][0]["parent_prediction"] == ours[0]["id"]
        else:
            assert task["annotations"] == []
    assert accepted > 0

    outcome = set_outcome(backend_client, loop.project, 1, loop.truth, label_config, auto_user)
    assert outcome.waiting == 0 and outcome.engineer == labelled
    assert outcome.auto + outcome.engineer == len(loop.plan.members(1))


def _start_training(loop: Loop) -> None:
    answer = httpx.post(
        f"{loop.backend_url}/webhook",
        json={"action": "START_TRAINING", "project": {"id": loop.project}},
        auth=AUTH,
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] in ("queued", "already queued")
