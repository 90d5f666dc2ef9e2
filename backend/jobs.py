"""The background work of the labeling loop, run by rq workers. Layer L2.

Two queues (`QUEUES`), both served by ``rq worker --url $REDIS_URL -w backend.jobs.WaferWorker
wafermap-events wafermap-training``:

- ``wafermap-events``: `advance_job` looks at the project in Label Studio and does the next
  step of the loop: ask for a retraining when a set is finished, else pre-annotate and
  auto-accept the open set with the served model.
- ``wafermap-training``: `retrain_job` trains a new model version on every annotated wafer so
  far (engineer, auto and known labels), stores it atomically beside the old ones, serves it,
  and then pre-annotates and auto-accepts the next set with it; and `read_ahead_job`, enqueued
  when a set opens, reads the labels while engineers work so that the retraining after the
  set's last label reads only what changed since.

Every advance first repairs what a killed worker or a lost Redis left behind
(`backend.reconcile`), then decides from Label Studio and the project's model store, never from
Redis marks: a finished set that no model learnt is retrained, open-set wafers without a
prediction of the served version are pre-annotated. It checks that it still holds the project
lock before each step that writes, and stops (`LockLostError`) when it does not.

Advances do not wait for events alone: every worker (`WaferWorker`) asks, every
`WAFER_RECONCILE_INTERVAL_S` seconds (300 by default; one of them does it), for a `sweep_job`
that requests an advance of every known project, so a lost webhook costs minutes.

The parts live apart: Redis keys and enqueueing in `backend.loop_keys`, the decisions in
`backend.loop_state`, the job's resources in `backend.job_resources`, the steps in
`backend.preannotation` and `backend.retraining`.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from redis import Redis
from redis.exceptions import RedisError
from rq import Worker, get_current_job
from rq.job import Job

from backend.allocator import keep_freed_memory
from backend.job_resources import (
    JobResources,
    job_redis,
    loop_position,
    open_job_resources,
    untried_wafers,
)
from backend.label_reads import read_labelled_tasks
from backend.labelstudio import LabelStudioClient, set_filter, unlabelled_filter
from backend.loop_keys import (
    ADVANCE_DEBOUNCE_S,
    LockLostError,
    advance_key,
    full_advance_key,
    opened_key,
    release_own,
    request_read_ahead,
    request_retrain,
    request_sweep,
    retrain_key,
    waiting_key,
)
from backend.loop_state import (
    decide,
    trained_through,
)
from backend.preannotation import accept_confident, preannotate_set, unaccepted_wafers
from backend.reconcile import repair_keys, repair_label_counts, sweep
from backend.retraining import retrain
from backend.settings import Settings

log = logging.getLogger(__name__)


class WaferWorker(Worker):
    """rq's forking worker, named from this module so the worker process imports the job code
    (and torch, about 4 s) once: ``rq worker -w backend.jobs.WaferWorker ...``. Each job still
    runs in its own fork, so a crash or a leak in one job does not outlive it.

    It also keeps the loop's timer: every `WAFER_RECONCILE_INTERVAL_S` seconds (read once, at
    start; 0 turns it off) one worker of all that share the Redis enqueues a `sweep_job`
    (`backend.loop_keys.request_sweep`). The timer ticks on the worker's own heartbeats: while
    idle (its wait for a job is cut to the interval) and while a job runs (rq beats every 30 s).
    The first sweep is due one interval after the worker started. Nothing else changes: the
    worker is started as before."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Set before rq's own __init__, which reads `dequeue_timeout` (its socket timeout).
        settings = Settings.from_env(os.environ)
        self.reconcile_interval_s = settings.reconcile_interval_s
        if settings.keep_freed_memory:
            keep_freed_memory()  # the job forks inherit it
        self._sweep_not_before = time.monotonic() + self.reconcile_interval_s
        super().__init__(*args, **kwargs)

    @property
    def dequeue_timeout(self) -> int:
        waited = super().dequeue_timeout
        if self.reconcile_interval_s > 0:
            return max(1, min(waited, int(self.reconcile_interval_s)))
        return waited

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        super().heartbeat(timeout, pipeline)
        if pipeline is None:
            self._tick()

    def maintain_heartbeats(self, job: Job) -> None:
        super().maintain_heartbeats(job)
        self._tick()

    def _tick(self) -> None:
        """Enqueue the periodic sweep when it is due (never raises: a worker must not die of
        its timer)."""
        if self.reconcile_interval_s <= 0 or time.monotonic() < self._sweep_not_before:
            return
        try:
            if request_sweep(self.connection, self.reconcile_interval_s):
                self.log.info("enqueued the periodic reconcile of every known project")
        except RedisError as exc:
            self.log.warning("could not enqueue the periodic reconcile: %s", exc)


#: The worker class to name on the command line.
WORKER_CLASS = f"{__name__}.{WaferWorker.__name__}"


# ---- job entry points -------------------------------------------------------------------------


def advance_job(project: int, light: bool = False) -> dict[str, Any]:
    """rq job: repair what a crash left behind, then do the project's next step. `light` (asked
    for by a person's label, and no full advance asked for since): see `advance`."""
    with open_job_resources(project) as resources:
        with resources.redis.pipeline() as pipe:
            pipe.delete(advance_key(project))
            pipe.get(full_advance_key(project))
            pipe.delete(full_advance_key(project))
            _, full, _ = pipe.execute()
        return advance(resources, project, light=light and full is None)


def retrain_job(project: int, set_number: int) -> dict[str, Any]:
    """rq job: retrain through `set_number`, serve the new version, open the next set.

    The set's retrain key is given back when the job ends, however it ends (a failure to even
    open the workbench included); a job killed outright leaves it to `backend.reconcile`. A
    follow-up advance that lost the project lock is reported in the outcome (the new version
    is served all the same; the next advance opens the next set).
    """
    job = get_current_job()
    try:
        with open_job_resources(project) as resources:
            outcome = retrain(resources, project, set_number)
            try:
                outcome["next"] = advance(resources, project)
            except LockLostError as exc:
                log.error("%s", exc)
                outcome["next"] = {"project": project, "stopped": str(exc)}
            return outcome
    finally:
        if job is not None:
            release_own(job.connection, retrain_key(project, set_number), job.id)


def read_ahead_job(project: int, set_number: int) -> dict[str, Any]:
    """rq job: read the project's labelled wafers while engineers label the open set, so that
    the set's retraining reads only what changed since (`backend.label_reads`).

    Enqueued once a set is opened (its auto labels made): the copy then holds every earlier
    set and the open set's auto labels, and the retraining after its last label asks Label
    Studio for the tasks changed since this read began (the engineers' labels) instead of
    every task of the set, or of the whole project the first time. A read ahead that fails
    or is overtaken loses nothing: the retraining reads in full when the copy is missing or
    disagrees with Label Studio's own count."""
    with open_job_resources(project) as resources:
        read = read_labelled_tasks(
            resources.client,
            resources.wafers,
            resources.settings.model_dir,
            project,
            set_number,
            resources.labels.image_value,
        )
        return {"action": "read-ahead", "set": set_number, "label_read": read.summary()}


def sweep_job() -> dict[str, list[int]]:
    """rq job: the periodic reconcile (`backend.reconcile.sweep`): one advance requested for
    every project the loop knows (Redis's list and MODEL_DIR's stores) that Label Studio still
    has."""
    settings = Settings.from_env(os.environ)
    redis, _ = job_redis(settings)
    url, key = settings.require_label_studio()
    with LabelStudioClient.connect(url, key) as client:
        return sweep(redis, settings.model_dir, client.project_exists)


# ---- the loop's step ---------------------------------------------------------------------------


def still_waiting(resources: JobResources, project: int) -> int | None:
    """The open set, when the last full advance left it to engineers (`waiting_key`) under the
    model still served and Label Studio still lists one of its wafers unlabelled (one query);
    else None."""
    hint = resources.redis.get(waiting_key(project))
    card = resources.store.current_card()
    if not isinstance(hint, bytes) or card is None:
        return None
    number, _, version = hint.decode().partition(":")
    if version != card.version or not number.isdigit():
        return None
    waiting = [set_filter(int(number)), unlabelled_filter()]
    return int(number) if resources.client.first_task(project, waiting) is not None else None


def advance(resources: JobResources, project: int, *, light: bool = False) -> dict[str, Any]:
    """Repair (`backend.reconcile.repair_keys`), then one pass of the loop's decision, read from
    Label Studio and the project's model store; pre-annotating may finish a set and so ask to
    retrain. Returns what was repaired and each step taken.

    `light` (a person's label): when the last full pass left the open set to engineers and a
    wafer of it still waits (`still_waiting`), that is all: one query instead of the whole
    pass's dozen over the project (measured ~1 s against ~10 s on a 172,950-wafer project),
    which engineers' labels would otherwise run back to back. The repairs the light pass skips
    are done by the next full one: the set's last label, new wafers, the periodic sweep."""
    if light and (waiting := still_waiting(resources, project)) is not None:
        checked = {"action": "wait", "set": waiting, "light": True}
        return {"project": project, "repaired": [], "steps": [checked]}
    resources.redis.delete(waiting_key(project))
    repaired = repair_keys(resources.redis, project)
    with resources.project_lock(project) as held:
        # The decision reads Label Studio's annotation counter: repair it first.
        repaired += repair_label_counts(resources.client, project, resources.labels, held.check)
        done: list[dict[str, Any]] = []
        for _ in range(2):
            card = resources.store.current_card()
            finished_through, open_set = loop_position(resources.client, project)
            untried = (
                untried_wafers(resources.client, project, open_set, card.version)
                if open_set is not None and card is not None
                else 0
            )
            step = decide(finished_through, open_set, untried == 0, trained_through(card))
            if step.action == "retrain" and step.set_number is not None:
                held.check(f"asking to retrain set {step.set_number}")
                enqueued = request_retrain(resources.redis, project, step.set_number)
                done.append({"action": "retrain", "set": step.set_number, "enqueued": enqueued})
                break
            classifier = resources.store.load_current() if step.action == "open" else None
            if step.set_number is not None and classifier is not None:
                if _marked_opened(
                    resources.redis, project, step.set_number, classifier.card.version
                ):
                    repaired.append(
                        f"set {step.set_number}: {untried} wafers without a prediction of "
                        f"{classifier.card.version} although Redis marked the set opened "
                        "(a lost TASKS_CREATED?): pre-annotating them"
                    )
                done.append(preannotate_set(resources, project, step.set_number, classifier))
                # The open set's auto labels are made: read the labels ahead while engineers
                # label its uncertain wafers (`read_ahead_job`).
                request_read_ahead(resources.redis, project, step.set_number)
                continue
            routing = (
                resources.wafers.routing(open_set, card.version)
                if open_set is not None and card is not None
                else None
            )
            if open_set is not None and card is not None and routing is not None:
                if (
                    routing.cut is not None
                    and resources.client.project_model_version(project) != card.version
                ):
                    # The pre-annotation stored its predictions but died before pointing the
                    # project at them: the score filter counts only the project's version.
                    held.check(f"pointing the project at {card.version}")
                    resources.client.set_model_version(project, card.version)
                    repaired.append(f"project model version set to {card.version}")
                left = unaccepted_wafers(resources.client, project, open_set, routing.cut)
                if left:
                    # The pre-annotation stored every prediction but its accept step did not
                    # finish (Label Studio unreachable, a crash): finish it, exactly once.
                    repaired.append(
                        f"set {open_set}: {left} auto-routed wafers of {card.version} were not "
                        "accepted (an interrupted accept step): accepting them"
                    )
                    outcome = accept_confident(
                        resources.client,
                        project,
                        open_set,
                        card.version,
                        resources.auto_user,
                        routing.cut,
                        check=held.check,
                    )
                    done.append({"action": "accept", "set": open_set, **outcome.__dict__})
            done.append({"action": "wait", "set": step.set_number})
            if card is not None and open_set is not None and step.set_number == open_set:
                hint = f"{open_set}:{card.version}"
                resources.redis.set(waiting_key(project), hint, ex=ADVANCE_DEBOUNCE_S)
            break
        return {"project": project, "repaired": repaired, "steps": done}


def _marked_opened(redis: Redis, project: int, set_number: int, version: str) -> bool:
    """Whether the Redis hint says `version` pre-annotated the whole set (only for the report:
    the decision asks Label Studio)."""
    mark = redis.hget(opened_key(project), str(set_number))
    return isinstance(mark, bytes) and mark.decode() == version
