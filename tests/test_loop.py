"""The whole loop against the real parts: Label Studio 1.23.2, Redis, an rq worker, gunicorn.

A small WM-811K subsample (an initial labelled set and two sets) goes through the product as a
user runs it: the set-up command wires the project (basic auth on, webhook with credentials),
the initial set is imported with its labels (die maps kept in the wafer store), the worker
trains the first model and opens set 1 (predictions scored by the routing measure, confident
wafers accepted), a second user labels the uncertain wafers through the SDK, exactly one
retraining runs, and set 2 is opened by the new model. Then new wafers arrive the fab's way
(`import_wafers`, unlabelled) as set 3 while set 2 is open: they wait for set 2's model, which
opens them once set 2 is labelled. The loop runs on the Label Studio of the session, which is
on PostgreSQL when one answers on 127.0.0.1:5432.
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
import numpy as np
import pytest
import torch
from redis import Redis
from rq import Queue
from rq.job import Job, JobStatus

from backend.harness.simulated_engineers import label_uncertain, set_outcome, wait_until_idle
from backend.harness.stack import (
    Credentials,
    LabelStudioServer,
    create_user,
    free_port,
    running_backend,
    running_worker,
    wait_for_worker,
)
from backend.jobs import WORKER_CLASS
from backend.label_config import LabelConfig
from backend.labelstudio import LabelStudioClient
from backend.loop_keys import QUEUES, TRAINING_QUEUE, read_ahead_job_id, retrain_job_id
from backend.model_store import ModelStore
from backend.projects import (
    ENGINEER_VIEW,
    SUSPECT_VIEW,
    audit_table,
    project_audits,
    set_counts,
    wire_project,
)
from backend.settings import Settings
from backend.wafer_sets import WM811K_SOURCE, SetPlan, import_sets, import_wafers, plan_sets
from backend.wafer_store import WaferStore
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
    wafers: WaferStore
    redis: Redis
    truth: dict[int, str]
    #: Wafers of the file that are in no set of the plan (the "new" wafers of set 3).
    spare: WaferMaps


def _version_of(task: dict[str, Any], version: str) -> list[dict[str, Any]]:
    return [p for p in task.get("predictions") or [] if p.get("model_version") == version]


def _spare(wafers: WaferMaps, plan: SetPlan) -> WaferMaps:
    """A dozen wafers of the file that no set of the plan holds."""
    planned = set(plan.wafers.source_row.tolist())
    rows = [i for i, w in enumerate(wafers.source_row.tolist()) if w not in planned]
    return wafers.subset(rows[:: max(1, len(rows) // 12)][:12])


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
        # Blind audits at the default 2% of the auto-routed wafers, at least 8 a set.
        "WAFER_AUDIT_MIN": "8",
        # Every advance here is the test's (or a webhook's); the workers' own periodic
        # reconcile is tested in tests/test_loop_repairs.py.
        "WAFER_RECONCILE_INTERVAL_S": "0",
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
        with LabelStudioClient.connect(label_studio.url, auto.token) as client:
            with LabelStudioClient.connect(label_studio.url, label_studio.api_key) as admin:
                wiring = wire_project(
                    admin, settings, f"loop {tag}", backend_url, client.current_user_id()
                )
            wafer_store = WaferStore.for_project(work / "models", wiring.project)
            import_sets(client, wiring.project, plan, label_config, store=wafer_store)
        wait_until_idle(redis, wiring.project, LOOP_TIMEOUT_S)
        yield Loop(
            server=label_studio,
            project=wiring.project,
            plan=plan,
            auto=auto,
            engineer=engineer,
            backend_url=backend_url,
            store=ModelStore.for_project(work / "models", wiring.project, torch.device("cpu")),
            wafers=wafer_store,
            redis=redis,
            truth=truth,
            spare=_spare(real_wafers[0], plan),
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
    # Its own token (backend.webhook_auth), never the Basic pair: Label Studio shows webhook
    # headers to every project member.
    authorization = hooks[0]["headers"]["Authorization"]
    assert authorization.startswith("Bearer ") and AUTH[1] not in authorization


def test_set_1_is_pre_annotated_and_its_confident_wafers_accepted(
    loop: Loop, backend_client: LabelStudioClient, label_config: LabelConfig
) -> None:
    first = loop.store.current_version()
    assert first is not None and first.endswith("set0")
    assert backend_client.project_model_version(loop.project) == first
    routing = loop.wafers.routing(1, first)
    assert routing is not None and routing.cut is not None
    # Least confidence with a fixed threshold of 0.3: auto when max p >= 0.7, the score is max p.
    assert routing.rule == "max p < 0.7" and routing.cut >= 0.7
    auto_user = backend_client.current_user_id()
    tasks = backend_client.tasks_of_set(loop.project, 1)
    assert len(tasks) == len(loop.plan.members(1))
    assert routing.auto + routing.engineer == len(tasks) and routing.unreadable == 0
    routes = {"auto": 0, "engineer": 0}
    # The blind audit: 8 auto-routed wafers (the minimum) held back for the engineers, with a
    # prediction that pre-selects nothing, scored just below the cut.
    assert len(routing.audit) == 8 and set(routing.audit.values()) <= set(
        label_config.failure_types
    )
    ids = {int(t["id"]) for t in tasks}
    assert set(routing.audit) <= ids and set(routing.sampled) <= ids
    assert not set(routing.audit) & set(routing.sampled)
    for task in tasks:
        ours = _version_of(task, first)
        assert len(ours) == 1, f"task {task['id']} has {len(ours)} predictions of {first}"
        score = ours[0]["score"]
        assert 0.0 < score <= 1.0
        if int(task["id"]) in routing.audit:
            assert ours[0]["result"] == [] and score < routing.cut
            assert task["annotations"] == []
            routes["engineer"] += 1
            continue
        assert ours[0]["result"][0]["value"]["choices"][0] in label_config.failure_types
        # No task data is written by the pre-annotation (the die maps came from the store).
        assert "route" not in task["data"] and "model_version" not in task["data"]
        annotations = task["annotations"]
        if score >= routing.cut:
            routes["auto"] += 1
            assert len(annotations) == 1
            assert annotations[0]["completed_by"] == auto_user
            assert annotations[0]["parent_prediction"] == ours[0]["id"]
        else:
            routes["engineer"] += 1
            assert score < 0.7
            assert annotations == []
    assert routes == {"auto": routing.auto, "engineer": routing.engineer}
    assert routes["auto"] > 0 and routes["engineer"] > 0, routes
    # `status` counts (count queries only) agree with the listing.
    states = set_counts(backend_client, loop.project, auto_user, first)
    assert sorted(states) == [0, 1, 2]
    one = states[1]
    assert (one.total, one.auto, one.engineer, one.waiting, one.predicted) == (
        len(tasks),
        routes["auto"],
        0,
        routes["engineer"],
        len(tasks),
    )
    assert states[0].known == states[0].total == len(loop.plan.members(0))
    assert states[2].predicted == 0 and states[2].waiting == states[2].total
    # Set 2 waits for the model that set 1 trains.
    assert all(not t["predictions"] for t in backend_client.tasks_of_set(loop.project, 2))


def test_the_engineer_queue_lists_the_uncertain_wafers_most_uncertain_first(
    loop: Loop, ls: LabelStudioClient
) -> None:
    views = {v: i for v, i in _views(ls, loop.project).items()}
    tasks = ls.tasks(loop.project, view=views[ENGINEER_VIEW])
    first = loop.store.current_version()
    routing = loop.wafers.routing(1, str(first))
    assert routing is not None and routing.cut is not None
    assert len(tasks) == routing.engineer
    assert all(t["total_annotations"] == 0 for t in tasks)
    # Sorted by the prediction score, lowest (least sure) first, all below the cut.
    scores = [_version_of(t, str(first))[0]["score"] for t in tasks]
    assert scores == sorted(scores) and max(scores) < routing.cut


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
    # Set 1's labels were read ahead while it was labelled (the copy of set 0 and set 1's auto
    # labels), so its retraining read only the changes since; set 2's read ahead ran after it.
    ahead = Job.fetch(read_ahead_job_id(loop.project, 1), connection=loop.redis)
    assert ahead.get_status() == JobStatus.FINISHED
    read_ahead, retrained = ahead.return_value(), job.return_value()
    assert read_ahead is not None and retrained is not None
    assert read_ahead["label_read"]["tasks"] >= len(loop.plan.members(0))
    assert retrained["label_read"]["how"] == "changes"
    following = Job.fetch(read_ahead_job_id(loop.project, 2), connection=loop.redis)
    assert following.get_status() == JobStatus.FINISHED
    assert (following.return_value() or {}).get("set") == 2
    assert Queue(TRAINING_QUEUE, connection=loop.redis).count == 0
    card = loop.store.card(second)
    assert card.trained_through_set == 1
    # set 1 was routed (auto labels), so its engineer labels are not a fair calibration sample,
    # but set 0's ~35 held-out wafers are fewer than unrouted_holdout's minimum: all are used
    assert card.training["calibration_wafers"] == "all person labels"
    assert card.validation is not None
    assert card.metrics["validation_wafers"] == len(card.validation.scores)

    assert backend_client.project_model_version(loop.project) == second
    auto_user = backend_client.current_user_id()
    routing = loop.wafers.routing(2, second)
    assert routing is not None
    tasks = backend_client.tasks_of_set(loop.project, 2)
    accepted = 0
    for task in tasks:
        ours = _version_of(task, second)
        assert len(ours) == 1
        if routing.cut is not None and ours[0]["score"] >= routing.cut:
            accepted += 1
            assert [a["completed_by"] for a in task["annotations"]] == [auto_user]
            assert task["annotations"][0]["parent_prediction"] == ours[0]["id"]
        else:
            assert task["annotations"] == []
    assert accepted == routing.auto

    outcome = set_outcome(backend_client, loop.project, 1, loop.truth, label_config, auto_user)
    assert outcome.waiting == 0 and outcome.engineer == labelled
    assert outcome.auto + outcome.engineer == len(loop.plan.members(1))
    # the wrong auto labels by wafer id: exactly the wafers labelled only by the backend with
    # a type other than the true one
    wrong = set()
    for task in backend_client.tasks_of_set(loop.project, 1):
        annotations = task["annotations"]
        if annotations and all(a["completed_by"] == auto_user for a in annotations):
            choice = annotations[0]["result"][0]["value"]["choices"][0]
            wafer = int(task["data"]["wafer_id"])
            if choice != loop.truth[wafer]:
                wrong.add(wafer)
    assert outcome.wrong_auto_wafers == tuple(sorted(wrong))
    assert len(outcome.wrong_auto_wafers) == outcome.auto_errors

    # The retraining recorded set 1's audit: the engineers' labels of the audit wafers against
    # the model's labels, which the test knows from the truth.
    audit = loop.wafers.audit(1)
    routing_1 = loop.wafers.routing(1, str(first))
    assert audit is not None and routing_1 is not None
    wafer_of = {
        int(t["id"]): int(t["data"]["wafer_id"])
        for t in backend_client.tasks_of_set(loop.project, 1)
    }
    agree = sum(loop.truth[wafer_of[t]] == label for t, label in routing_1.audit.items())
    assert (audit.audited, audit.pending, audit.agreed) == (8, 0, agree)
    assert (audit.wafers, audit.auto_labels) == (len(loop.plan.members(1)), outcome.auto)
    low, high = audit.accuracy_interval
    assert 0.0 <= low <= agree / 8 <= high <= 1.0
    # every wafer but the 8 blind ones carries the model's guess, which the outcome grades
    assert (
        outcome.predicted == audit.wafers - 8 and 0 < outcome.predicted_right <= outcome.predicted
    )
    # Person labels of held-out wafers that a model confidently calls something else are
    # marked for the Suspect labels tab, by each retraining (the first model's, then set 1's):
    # the tab lists exactly the marked wafers, as many as each model's card says it marked.
    suspects = backend_client.tasks(
        loop.project, view=_views(backend_client, loop.project)[SUSPECT_VIEW]
    )
    marked = {v: loop.store.card(v).metrics.get("suspect_labels", 0.0) for v in versions}
    by_version: dict[str, int] = {}
    for task in suspects:
        data = task["data"]
        assert data["suspect_probability"] >= 0.9
        assert data["suspect_label"] != loop.truth.get(int(data["wafer_id"]))
        by_version[data["suspect_model_version"]] = (
            by_version.get(data["suspect_model_version"], 0) + 1
        )
    # the newest mark of a wafer wins; set 1's model marks all of its own
    assert by_version.get(second, 0) == marked[second]
    assert sum(by_version.values()) <= sum(marked.values())
    # `status` shows it.
    states = set_counts(backend_client, loop.project, auto_user, second)
    shown = audit_table(project_audits(backend_client, loop.wafers, states, label_config, 0.995))
    assert f"| 1 | 8 | 8 | {agree} |" in shown


def _start_training(loop: Loop) -> None:
    answer = httpx.post(
        f"{loop.backend_url}/webhook",
        json={"action": "START_TRAINING", "project": {"id": loop.project}},
        auth=AUTH,
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] in ("queued", "already queued")


def test_new_unlabelled_wafers_appended_as_set_3_wait_then_open_with_the_next_model(
    loop: Loop, backend_client: LabelStudioClient, label_config: LabelConfig
) -> None:
    second = loop.store.current_version()
    outcome = import_wafers(
        backend_client,
        loop.project,
        loop.spare,
        label_config,
        [np.arange(len(loop.spare))],
        source=WM811K_SOURCE,
        store=loop.wafers,
        progress=False,
    )
    assert outcome.imported == {3: len(loop.spare)} and outcome.skipped == 0
    wait_until_idle(loop.redis, loop.project, LOOP_TIMEOUT_S)
    new = backend_client.tasks_of_set(loop.project, 3)
    assert len(new) == len(loop.spare)
    if backend_client.tasks_of_set(loop.project, 2, only_unlabelled=True):
        # Set 2 is open (engineers have wafers to label): the new set waits for its model.
        assert all(not t["predictions"] and not t["annotations"] for t in new)
    # The same wafers again: skipped, never duplicated.
    again = import_wafers(
        backend_client,
        loop.project,
        loop.spare,
        label_config,
        [np.arange(len(loop.spare))],
        source=WM811K_SOURCE,
        store=loop.wafers,
        progress=False,
    )
    assert again.imported == {} and again.skipped == len(loop.spare)

    truth = loop.truth | {
        int(w): loop.spare.classes[int(c)]
        for w, c in zip(loop.spare.source_row, loop.spare.labels, strict=True)
    }
    with LabelStudioClient.connect(loop.server.url, loop.engineer.token) as person:
        assert label_uncertain(person, loop.project, 2, truth, label_config) >= 0
    wait_until_idle(loop.redis, loop.project, LOOP_TIMEOUT_S)
    # Set 2's model opened set 3 (which may since have finished and trained a set-3 model).
    third = next(v for v in loop.store.versions() if v.endswith("set2"))
    assert third != second
    routing = loop.wafers.routing(3, third)
    assert routing is not None and routing.auto + routing.engineer == len(loop.spare)
    for task in backend_client.tasks_of_set(loop.project, 3):
        assert len(_version_of(task, third)) == 1
