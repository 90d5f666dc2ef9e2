"""The loop recovers from the faults that used to stall it, and keeps projects apart, with the real parts: Label Studio
1.23.2, a redis-server of its own (so it can be stopped), real rq worker processes killed with
SIGKILL, and the `reconcile` command.

The project has no ML backend and no webhook: Label Studio tells the backend nothing, which is
the worst case of a lost webhook; the loop is driven by advance jobs and `reconcile` only.
One project goes through the faults in order (the tests share it and run in file order):

1. a worker SIGKILLed while retraining set 1: the old model stays served, and after a new
   worker and `reconcile` the set retrains once and the loop goes on;
2. a worker SIGKILLed inside the project lock: the next advance job runs at once;
3. wafers added to the open set with their TASKS_CREATED lost: the next advance pre-annotates
   them although Redis marked the set opened;
4. Redis stopped and restarted (empty) right after set 2 was finished: after recovery set 2 is
   learnt and set 3 opened, and no label or model is lost;
5. a second project retraining in the same MODEL_DIR changes neither the model this project
   serves nor the set it counts as learnt.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from redis import Redis
from rq import Queue, Worker, get_current_job
from rq.job import Job, JobStatus

from backend import cli
from backend.harness.simulated_engineers import label_uncertain, wait_until_idle
from backend.harness.stack import (
    Credentials,
    LabelStudioServer,
    create_user,
    free_port,
    running_redis,
    running_worker,
    wait_for_worker,
)
from backend.job_resources import JobResources
from backend.jobs import WORKER_CLASS, advance
from backend.label_config import LabelConfig
from backend.labelstudio import FilterOperator, LabelStudioClient, TaskFilter, set_filter
from backend.loop_keys import (
    ADVANCE_JOB,
    EVENTS_QUEUE,
    HEARTBEAT_TTL_S,
    LOCK_TTL_S,
    QUEUES,
    heartbeat_key,
    job_heartbeat,
    lock_key,
    opened_key,
    project_lock,
    request_advance,
    retrain_job_id,
    retrain_key,
)
from backend.loop_state import trained_through
from backend.model_store import ModelStore
from backend.retraining import retrain
from backend.settings import Settings
from backend.wafer_sets import SetPlan, import_sets, plan_sets, wafer_task
from backend.wafer_store import WaferStore
from backend.wafers import WaferMaps

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

WAIT_S = 600
#: A retraining that certainly still trains when the test kills its worker.
SLOW_EPOCHS = "400"


def hold_project_lock(project: int) -> None:
    """rq job for test 2: take the project lock as an advance job does, and never let go."""
    job = get_current_job()
    assert job is not None
    with job_heartbeat(job.connection, job.id), project_lock(job.connection, project, job.id):
        job.connection.set(f"test:lock-held:{project}", job.id)
        time.sleep(3600)


class OwnRedis:
    """A redis-server of this module's own (no persistence), to stop and start again."""

    def __init__(self, data_dir: Path) -> None:
        self.url = f"redis://127.0.0.1:{free_port()}/0"
        self.data_dir = data_dir
        self._running: contextlib.ExitStack | None = None

    def start(self) -> None:
        self._running = contextlib.ExitStack()
        self._running.enter_context(running_redis(self.url, self.data_dir))

    def stop(self) -> None:
        if self._running is not None:
            self._running.close()
            self._running = None


@dataclass
class World:
    server: LabelStudioServer
    project: int
    plan: SetPlan
    truth: dict[int, str]
    auto: Credentials
    engineer: Credentials
    env: dict[str, str]
    own_redis: OwnRedis
    redis: Redis
    store: ModelStore
    work: Path
    workers: contextlib.ExitStack
    settings: Settings
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)

    def start_workers(self, count: int, **extra: str) -> list[subprocess.Popen[bytes]]:
        started = []
        for _ in range(count):
            log = self.work / f"worker-{uuid.uuid4().hex[:6]}.log"
            process = self.workers.enter_context(
                running_worker(
                    self.env | extra, self.own_redis.url, QUEUES, log, worker_class=WORKER_CLASS
                )
            )
            started.append((process, log))
        for process, log in started:
            wait_for_worker(self.own_redis.url, QUEUES, 300, pid=process.pid, log_path=log)
        self.processes += [p for p, _ in started]
        return [p for p, _ in started]

    def client(self, who: Credentials) -> LabelStudioClient:
        return LabelStudioClient.connect(self.server.url, who.token)


@pytest.fixture(scope="module")
def world(
    label_studio: LabelStudioServer,
    ls: LabelStudioClient,
    real_wafers: tuple[WaferMaps, Any],
    label_config: LabelConfig,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[World]:
    work = tmp_path_factory.mktemp("recovery")
    own_redis = OwnRedis(work / "redis")
    own_redis.start()
    tag = uuid.uuid4().hex[:8]
    auto = create_user(label_studio, f"auto-{tag}@example.com", secrets.token_urlsafe(12))
    engineer = create_user(label_studio, f"engineer-{tag}@example.com", secrets.token_urlsafe(12))
    env = {
        "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": auto.token,
        "REDIS_URL": own_redis.url,
        "MODEL_DIR": str(work / "models"),
        "WAFER_BACKBONE": "resnet18",
        "WAFER_IMAGE_SIZE": "32",
        "WAFER_EPOCHS": "1",
        "WAFER_DEVICE": "cpu",
        "WAFER_ROUTE_MEASURE": "least-confidence",
        "WAFER_ROUTE_THRESHOLD": "0.3",
        # Every advance here is the test's (or a webhook's); the workers' own periodic
        # reconcile is tested in tests/test_loop_repairs.py.
        "WAFER_RECONCILE_INTERVAL_S": "0",
        # Sets of a few dozen wafers: the audit's minimum would take every auto-routed wafer.
        # Audits are tested in tests/test_loop.py.
        "WAFER_AUDIT_FRACTION": "0",
    }
    settings = dataclasses.replace(
        Settings.from_env(env), label_config_path=Settings().label_config_path
    )
    plan = plan_sets(real_wafers[0], subsample=0.001, initial_fraction=0.5, n_sets=3, seed=5)
    truth = {
        int(plan.wafers.source_row[i]): plan.wafers.classes[int(plan.wafers.labels[i])]
        for i in range(len(plan.wafers))
    }
    project = ls.create_project(f"recovery {tag}", settings.label_config_path.read_text())
    with LabelStudioClient.connect(label_studio.url, auto.token) as client:
        import_sets(client, project, plan, label_config)
    redis = Redis.from_url(own_redis.url)
    with contextlib.ExitStack() as workers:
        world = World(
            server=label_studio,
            project=project,
            plan=plan,
            truth=truth,
            auto=auto,
            engineer=engineer,
            env=env,
            own_redis=own_redis,
            redis=redis,
            store=ModelStore.for_project(work / "models", project, torch.device("cpu")),
            work=work,
            workers=workers,
            settings=settings,
        )
        yield world
    print("\n".join(world.faults))
    world.redis.close()
    own_redis.stop()


def wait_for(what: str, check: Callable[[], bool], timeout: float = WAIT_S) -> None:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(0.3)


def kill_worker_running(world: World, job_id: str) -> None:
    """SIGKILL the rq worker running `job_id` and its work horse (a lost machine, an OOM kill)."""
    worker_pids = [
        w.pid for w in Worker.all(connection=world.redis) if w.get_current_job_id() == job_id
    ]
    beat: Any = world.redis.get(heartbeat_key(job_id))
    assert worker_pids and beat is not None, "the job is not running"
    os.kill(int(beat.decode().split("|")[1]), signal.SIGKILL)
    for process in world.processes:
        if process.pid in worker_pids:
            process.kill()
            process.wait(timeout=30)


def advance_now(world: World) -> dict[str, Any]:
    """Enqueue one advance job (as any event or Start Training would), wait for the loop to
    settle, and return that job's outcome."""
    job = Queue(EVENTS_QUEUE, connection=world.redis).enqueue(ADVANCE_JOB, world.project)
    wait_until_idle(world.redis, world.project, WAIT_S)
    job.refresh()
    assert job.get_status() == JobStatus.FINISHED, job.latest_result()
    outcome = job.return_value()
    assert isinstance(outcome, dict)
    return outcome


def predictions_of(
    client: LabelStudioClient, project: int, set_number: int, version: str
) -> list[int]:
    """Per task of the set, how many predictions of `version` it carries."""
    return [
        sum(p.get("model_version") == version for p in t.get("predictions") or [])
        for t in client.tasks_of_set(project, set_number)
    ]


# ---- 1. a worker killed mid-retraining ---------------------------------------------------------


def test_a_worker_killed_mid_retraining_leaves_the_model_served_and_is_recovered(
    world: World,
    label_config: LabelConfig,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The first model, trained here on the initial set.
    bench = JobResources.open(world.settings, world.redis, world.project)
    try:
        first = retrain(bench, world.project, 0)["model_version"]
    finally:
        bench.close()
    with world.client(world.engineer) as person:
        assert label_uncertain(person, world.project, 1, world.truth, label_config) > 0
    # A worker that trains slowly takes the set-1 retraining; it is killed while training.
    [slow] = world.start_workers(1, WAFER_EPOCHS=SLOW_EPOCHS)
    assert request_advance(world.redis, world.project)
    job_id = retrain_job_id(world.project, 1)

    def training() -> bool:
        with contextlib.suppress(Exception):
            return Job.fetch(job_id, connection=world.redis).get_meta().get("stage") == "training"
        return False

    wait_for("the set-1 retraining", training)
    kill_worker_running(world, job_id)
    assert slow.poll() is not None
    # Meanwhile the old model stays served, whole.
    assert world.store.versions() == [first]
    assert world.store.current_version() == first
    served = ModelStore.for_project(world.work / "models", world.project, torch.device("cpu"))
    assert served.load_current() is not None and served.problems() == []
    assert world.redis.get(retrain_key(world.project, 1)) == job_id.encode()

    # A new worker, and reconcile (by hand, as an operator would; any event does the same).
    world.start_workers(2)
    for name, value in world.env.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["reconcile", "--project", str(world.project)]) == 0
    printed = capsys.readouterr().out
    world.faults.append(f"killed mid-retraining; reconcile printed:\n{printed}")
    assert f"released the retrain key of dead job {job_id}" in printed
    assert '"action": "retrain"' in printed and '"enqueued": true' in printed
    wait_until_idle(world.redis, world.project, WAIT_S)

    versions = world.store.versions()
    assert len(versions) == 2 and versions[0] == first, versions
    second = world.store.current_version()
    assert second == versions[1] and second.endswith("set1")
    assert trained_through(world.store.card(second)) == 1
    assert Job.fetch(job_id, connection=world.redis).get_status() == JobStatus.FINISHED
    with world.client(world.auto) as client:
        assert set(predictions_of(client, world.project, 2, second)) == {1}


# ---- 2. a worker killed inside the project lock -------------------------------------------------


def test_a_worker_killed_inside_the_project_lock_does_not_block_the_next_advance(
    world: World,
) -> None:
    job = Queue(EVENTS_QUEUE, connection=world.redis).enqueue(
        f"{__name__}.hold_project_lock", world.project
    )
    wait_for("the lock", lambda: world.redis.exists(f"test:lock-held:{world.project}") == 1)
    ttl: Any = world.redis.ttl(lock_key(world.project))
    assert 0 < ttl <= LOCK_TTL_S  # seconds, where it used to be 6 hours
    kill_worker_running(world, job.id)
    assert world.redis.exists(lock_key(world.project))

    outcome = advance_now(world)
    world.faults.append(f"killed inside the project lock; the next advance: {outcome}")
    # The next advance ran (breaking the dead holder's lock, or finding it expired).
    assert outcome["steps"][-1] == {"action": "wait", "set": 2}, outcome
    assert not world.redis.exists(lock_key(world.project))


# ---- 3. a lost TASKS_CREATED ------------------------------------------------------------------


def test_wafers_added_without_a_webhook_are_pre_annotated_by_the_next_advance(
    world: World, label_config: LabelConfig
) -> None:
    version = world.store.current_version()
    assert version is not None
    assert world.redis.hget(opened_key(world.project), "2") == version.encode()
    extra = [
        wafer_task(world.plan.wafers, int(i), 2, label_config, with_label=False)
        for i in world.plan.members(3)[:3]
    ]
    with world.client(world.auto) as client:
        added = client.import_tasks(world.project, extra)
        assert predictions_of(client, world.project, 2, version).count(0) == len(added)
    # No webhook came; the next advance (any event, Start Training, or reconcile) looks.
    outcome = advance_now(world)
    world.faults.append(f"lost TASKS_CREATED; the next advance: {outcome}")
    assert any("lost TASKS_CREATED" in line for line in outcome["repaired"]), outcome
    with world.client(world.auto) as client:
        assert set(predictions_of(client, world.project, 2, version)) == {1}


def test_an_interrupted_accept_step_is_finished_by_the_next_advance_exactly_once(
    world: World,
) -> None:
    """The state an accept step that died leaves (Label Studio unreachable, a killed worker):
    the set's predictions and its routing (the score cut) are stored, wafers scoring at or
    above the cut have no label. Made here by lowering the kept cut so that the two surest
    waiting wafers are at or above it."""
    version = world.store.current_version()
    assert version is not None
    wafer_store = WaferStore.for_project(Path(world.env["MODEL_DIR"]), world.project)
    routing = wafer_store.routing(2, version)
    assert routing is not None
    with world.client(world.auto) as client:
        auto_user = client.current_user_id()
        tasks = client.tasks_of_set(world.project, 2)
        scored = sorted(
            (
                next(p["score"] for p in t["predictions"] if p.get("model_version") == version),
                t["id"],
            )
            for t in tasks
            if not t.get("annotations")
            and any(p.get("model_version") == version for p in t.get("predictions") or [])
        )
        assert len(scored) >= 3, "set 2 keeps unlabelled wafers for the later tests"
        waiting = [{"id": task_id} for _, task_id in scored[-2:]]
        assert scored[-3][0] < scored[-2][0], "two wafers share the boundary score"
    wafer_store.save_routing(dataclasses.replace(routing, cut=scored[-2][0]))
    outcome = advance_now(world)
    world.faults.append(f"accept step interrupted (2 auto wafers unlabelled); advance: {outcome}")
    assert any("interrupted accept step" in line for line in outcome["repaired"]), outcome
    with world.client(world.auto) as client:
        after = {t["id"]: t for t in client.tasks_of_set(world.project, 2)}
    autos = {
        i: [a for a in t.get("annotations") or [] if a.get("completed_by") == auto_user]
        for i, t in after.items()
    }
    assert all(len(autos[t["id"]]) == 1 for t in waiting[:2]), autos
    assert max(len(a) for a in autos.values()) == 1
    # A second advance finds nothing left to accept.
    again = advance_now(world)
    assert not any("interrupted accept step" in line for line in again["repaired"]), again


# ---- 4. Redis stopped and restarted mid-loop ---------------------------------------------------


def test_redis_stopped_and_restarted_mid_loop_loses_nothing(
    world: World, label_config: LabelConfig
) -> None:
    with world.client(world.engineer) as person:
        assert label_uncertain(person, world.project, 2, world.truth, label_config) > 0
    with world.client(world.auto) as client:
        labelled = {
            n: client.count_tasks(
                world.project,
                [
                    set_filter(n),
                    TaskFilter("total_annotations", FilterOperator.GREATER, "Number", 0),
                ],
            )
            for n in (0, 1, 2)
        }
    versions_before = world.store.versions()
    # The engineer's last label asks for an advance, and Redis goes away right then: the
    # queued job, the keys and the "opened" marks are lost (no persistence).
    assert request_advance(world.redis, world.project)
    world.own_redis.stop()
    time.sleep(2)
    world.own_redis.start()
    world.redis = Redis.from_url(world.own_redis.url)
    assert world.redis.dbsize() == 0
    # A job that was running announces itself again within a third of its heartbeat's expiry.
    time.sleep(HEARTBEAT_TTL_S / 3 + 1)
    survivors = sum(p.poll() is None for p in world.processes)
    world.faults.append(f"Redis restarted: {survivors} of {len(world.processes)} workers alive")
    # Workers reconnect by themselves; one more is started in case none survived.
    world.start_workers(1)

    def learnt_set_2() -> bool:
        card = world.store.current_card()
        return card is not None and trained_through(card) == 2

    outcomes = []
    for _ in range(5):
        outcomes.append(advance_now(world))
        if learnt_set_2():
            break
        time.sleep(5)
    world.faults.append(f"Redis restarted; advances after recovery: {outcomes}")
    assert learnt_set_2(), outcomes
    current = world.store.current_version()
    assert current is not None
    new = [v for v in world.store.versions() if v not in versions_before]
    assert new and all(v.endswith("set2") for v in new), new
    assert world.store.versions()[: len(versions_before)] == versions_before
    with world.client(world.auto) as client:
        for n, count in labelled.items():
            after = client.count_tasks(
                world.project,
                [
                    set_filter(n),
                    TaskFilter("total_annotations", FilterOperator.GREATER, "Number", 0),
                ],
            )
            assert after == count, f"set {n}: {count} labelled before, {after} after"
        assert set(predictions_of(client, world.project, 3, current)) == {1}
    # All is repaired: a last reconcile finds nothing to do.
    bench = JobResources.open(world.settings, world.redis, world.project)
    try:
        last = advance(bench, world.project)
    finally:
        bench.close()
    assert last["repaired"] == [] and last["steps"][-1]["action"] == "wait", last


# ---- 5. two projects, one MODEL_DIR ------------------------------------------------------------


def test_another_project_retraining_changes_nothing_of_this_one(
    world: World,
    ls: LabelStudioClient,
    label_config: LabelConfig,
    real_wafers: tuple[WaferMaps, Any],
) -> None:
    served = world.store.current_version()
    card = world.store.current_card()
    assert served is not None and card is not None
    other_plan = plan_sets(real_wafers[0], subsample=0.0005, initial_fraction=0.5, n_sets=1, seed=9)
    config = world.settings.label_config_path.read_text()
    other = ls.create_project(f"other {uuid.uuid4().hex[:8]}", config)
    with world.client(world.auto) as client:
        import_sets(client, other, other_plan, label_config, [0])
    bench = JobResources.open(world.settings, world.redis, other)
    try:
        outcome = retrain(bench, other, 0)
        other_step = advance(bench, other)
    finally:
        bench.close()
    other_store = ModelStore.for_project(world.work / "models", other, torch.device("cpu"))
    assert other_store.current_version() == outcome["model_version"]
    assert other_store.root != world.store.root
    # Project A serves and counts as learnt exactly what it did before.
    fresh = ModelStore.for_project(world.work / "models", world.project, torch.device("cpu"))
    assert fresh.current_version() == served
    assert trained_through(fresh.current_card()) == trained_through(card) == 2
    assert other_step["steps"][-1]["action"] == "wait", other_step
    bench = JobResources.open(world.settings, world.redis, world.project)
    try:
        again = advance(bench, world.project)
    finally:
        bench.close()
    assert again["steps"][-1]["action"] == "wait" and again["repaired"] == [], again
    assert fresh.versions() == world.store.versions()
