"""The background work of the labeling loop, run by rq workers. Layer L2.

Two queues (`QUEUES`), both served by ``rq worker --url $REDIS_URL wafermap-events
wafermap-training``:

- ``wafermap-events``: `advance_job` looks at the project in Label Studio and does the next
  step of the loop: ask for a retraining when a set is finished, else pre-annotate and
  auto-accept the open set with the served model.
- ``wafermap-training``: `retrain_job` trains a new model version on every annotated wafer so
  far (engineer, auto and known labels), stores it atomically beside the old ones, serves it,
  and then pre-annotates and auto-accepts the next set with it.

The loop, per project: set 0 (the initial set) is imported with known labels; the OPEN set is
the lowest-numbered set that still has a wafer without an annotation. Only the open set is
pre-annotated and auto-accepted; later sets wait for the model that the open set will train,
so every set is routed by a model that learnt from all sets before it.

Exactly once: a retraining for (project, set) is enqueued only by whoever wins a Redis
``SET NX`` on its key, so repeated or concurrent webhooks cannot enqueue a second one; a
retraining that fails releases the key so the next webhook (or Start Training) tries again.
Advancing is debounced the same way with a short-lived key that the job clears when it starts.
A Redis lock per project keeps two workers from pre-annotating the same set at once.

The Redis connection is always passed in; the job entry points build everything else from
`Settings.from_env(os.environ)` once per job.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
from redis import Redis
from rq import Queue, Worker, get_current_job

from backend.calibration import calibrate
from backend.classifier import ModelCard, WaferClassifier, build_network, pick_device
from backend.images import ImageError, model_input
from backend.label_config import LabelConfig, parse_label_config
from backend.labelstudio import (
    FilterOperator,
    LabelStudioClient,
    TaskFilter,
    set_filter,
    unlabelled_filter,
)
from backend.model_store import ModelStore
from backend.predictions import WaferPrediction, predict_tasks, to_label_studio
from backend.routing import Route, RoutingRule
from backend.settings import Settings
from backend.splits import stable_holdout
from backend.training import TrainConfig, logit_adjustment, train_network
from backend.uncertainty import Measure, uncertainty
from backend.wafer_sets import INITIAL_SET

log = logging.getLogger(__name__)

EVENTS_QUEUE = "wafermap-events"
TRAINING_QUEUE = "wafermap-training"
QUEUES = (EVENTS_QUEUE, TRAINING_QUEUE)
#: How long a retraining may run before rq stops it.
RETRAIN_TIMEOUT_S = 6 * 3600
#: How long an "advance pending" mark lives if its job never starts (a dead worker).
ADVANCE_DEBOUNCE_S = 600
#: Task data fields the pre-annotation writes (Data Manager columns).
DATA_FIELDS = ("predicted", "score", "least_confidence", "margin", "entropy", "route")
#: Parallel task-data updates (one HTTP request each).
UPDATE_THREADS = 8


class LabelSource(StrEnum):
    """Who labelled a wafer."""

    KNOWN = "known"  # imported with the initial set
    AUTO = "auto"  # accepted by the backend from its prediction
    ENGINEER = "engineer"  # labelled by a person in Label Studio


class WaferWorker(Worker):
    """rq's forking worker, named from this module so the worker process imports the job code
    (and torch, about 4 s) once: ``rq worker -w backend.jobs.WaferWorker ...``. Each job still
    runs in its own fork, so a crash or a leak in one job does not outlive it."""


#: The worker class to name on the command line.
WORKER_CLASS = f"{__name__}.{WaferWorker.__name__}"


def retrain_key(project: int, set_number: int) -> str:
    return f"wafermap:project:{project}:retrain:set:{set_number}"


def advance_key(project: int) -> str:
    return f"wafermap:project:{project}:advance-pending"


def opened_key(project: int) -> str:
    """Redis hash: set number -> the model version that pre-annotated all of it."""
    return f"wafermap:project:{project}:opened"


def retrain_job_id(project: int, set_number: int) -> str:
    return f"wafermap-retrain-p{project}-set{set_number}"


# ---- reading the project's state ------------------------------------------------------------


def _set_number(task: Mapping[str, Any]) -> int | None:
    data = task.get("data") or {}
    value = data.get("set") if isinstance(data, Mapping) else None
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def _annotations(task: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]


def annotation_source(annotation: Mapping[str, Any], auto_user: int) -> LabelSource:
    """AUTO for the backend's own accepted predictions, ENGINEER for a person's label, KNOWN
    for a label imported without a prediction by the backend's account (the initial set)."""
    if annotation.get("completed_by") == auto_user:
        return LabelSource.AUTO if annotation.get("parent_prediction") else LabelSource.KNOWN
    return LabelSource.ENGINEER


def label_of(task: Mapping[str, Any], labels: LabelConfig, auto_user: int) -> str | None:
    """The failure type a task is labelled with: a person's latest label beats an auto label."""
    ranked = sorted(
        _annotations(task),
        key=lambda a: (annotation_source(a, auto_user) is not LabelSource.AUTO, a.get("id") or 0),
    )
    for annotation in reversed(ranked):
        for item in annotation.get("result") or []:
            if item.get("from_name") != labels.from_name:
                continue
            choices = (item.get("value") or {}).get("choices") or []
            if choices:
                return str(choices[0])
    return None


@dataclass(frozen=True)
class SetState:
    """Counts of one wafer set in Label Studio."""

    number: int
    total: int
    auto: int
    engineer: int
    known: int
    waiting: int
    predicted: int  # tasks with a prediction of the served model version

    @property
    def finished(self) -> bool:
        return self.total > 0 and self.waiting == 0


def set_states(
    tasks: Sequence[Mapping[str, Any]], auto_user: int, model_version: str | None
) -> dict[int, SetState]:
    """Per `data.set`, how many wafers are labelled by whom and how many wait."""
    counts: dict[int, Counter[str]] = {}
    for task in tasks:
        number = _set_number(task)
        if number is None:
            continue
        c = counts.setdefault(number, Counter())
        c["total"] += 1
        annotations = _annotations(task)
        if not annotations:
            c["waiting"] += 1
        else:
            sources = {annotation_source(a, auto_user) for a in annotations}
            for source in (LabelSource.ENGINEER, LabelSource.KNOWN, LabelSource.AUTO):
                if source in sources:
                    c[source.value] += 1
                    break
        if model_version and any(
            p.get("model_version") == model_version for p in task.get("predictions") or []
        ):
            c["predicted"] += 1
    return {
        n: SetState(
            number=n,
            total=c["total"],
            auto=c["auto"],
            engineer=c["engineer"],
            known=c["known"],
            waiting=c["waiting"],
            predicted=c["predicted"],
        )
        for n, c in sorted(counts.items())
    }


@dataclass(frozen=True)
class NextStep:
    """What the loop does next: "retrain" set `set_number`, "open" it, or "wait"."""

    action: str
    set_number: int | None = None


def decide(
    finished_through: int | None,
    open_set: int | None,
    open_set_predicted: bool,
    trained_through: int | None,
) -> NextStep:
    """The loop's decision.

    `finished_through` is the last set of the unbroken run 0..S of fully labelled sets (None
    when set 0 is not), `open_set` the lowest set with an unlabelled wafer (None when none),
    `open_set_predicted` whether every wafer of it has a prediction of the served model, and
    `trained_through` the last set the served model learnt from (None without a model).

    Retrain through S when the served model has not seen S; otherwise open the open set
    (pre-annotate it) unless the served model predicted all of it already; otherwise wait.
    """
    if finished_through is not None and (
        trained_through is None or finished_through > trained_through
    ):
        return NextStep("retrain", finished_through)
    if open_set is None or trained_through is None:
        return NextStep("wait")
    if not open_set_predicted:
        return NextStep("open", open_set)
    return NextStep("wait", open_set)


def next_step(states: Mapping[int, SetState], trained_through: int | None) -> NextStep:
    """`decide` from per-set counts (as `set_states` makes them from a task listing)."""
    finished_through: int | None = None
    for number in sorted(states):
        if not states[number].finished:
            break
        finished_through = number
    open_sets = [n for n in sorted(states) if not states[n].finished]
    open_set = open_sets[0] if open_sets else None
    predicted = open_set is not None and states[open_set].predicted >= states[open_set].total
    return decide(finished_through, open_set, predicted, trained_through)


def loop_position(client: LabelStudioClient, project: int) -> tuple[int | None, int | None]:
    """(finished_through, open_set) from two small queries per set, whatever the project's size.

    Sets are numbered 0 (the initial set), 1, 2, ... without gaps; the first number without
    any task ends the walk.
    """
    finished_through: int | None = None
    number = INITIAL_SET
    while client.first_task(project, [set_filter(number)]) is not None:
        if client.first_task(project, [set_filter(number), unlabelled_filter()]) is not None:
            return finished_through, number
        finished_through = number
        number += 1
    return finished_through, None


def trained_through(card: ModelCard | None) -> int | None:
    """The last set the model learnt from (`training.trained_through_set` of its card)."""
    if card is None:
        return None
    value = card.training.get("trained_through_set")
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def serving_rule(
    settings: Settings, card: ModelCard | None, probs: npt.NDArray[np.float64] | None = None
) -> RoutingRule:
    """The routing rule in force for wafers with probabilities `probs`.

    A fixed WAFER_ROUTE_THRESHOLD wins. Else, with the model's held-out validation wafers in
    its card and the batch's probabilities, the threshold is calibrated now, to
    WAFER_TARGET_ACCURACY on THIS batch (its own share of confident wafers). Else the threshold
    calibrated at training time; else (no validation yet) every wafer goes to engineers.
    """
    measure = Measure(settings.route_measure)
    if settings.route_threshold is not None:
        return RoutingRule(measure, settings.route_threshold)
    if card is None:
        return RoutingRule(measure, -math.inf)
    validation = card.training.get("validation")
    if probs is not None and isinstance(validation, Mapping) and len(probs):
        stored = Measure(str(validation["measure"]))
        return calibrate(
            np.asarray(validation["scores"], dtype=np.float64),
            np.asarray(validation["correct"], dtype=np.bool_),
            stored,
            settings.target_accuracy,
            new_scores=uncertainty(probs, stored),
        ).rule
    if "route_threshold" in card.metrics:
        stored = Measure(str(card.training.get("route_measure", measure.value)))
        return RoutingRule(stored, float(card.metrics["route_threshold"]))
    return RoutingRule(measure, -math.inf)


# ---- enqueueing (called by the webhook handler and the CLI) -----------------------------------


def request_advance(redis: Redis, project: int) -> bool:
    """Enqueue one `advance_job` for the project unless one is waiting; True when enqueued."""
    if not redis.set(advance_key(project), "1", nx=True, ex=ADVANCE_DEBOUNCE_S):
        return False
    try:
        Queue(EVENTS_QUEUE, connection=redis).enqueue(
            advance_job,
            project,
            job_timeout=RETRAIN_TIMEOUT_S,
            description=f"advance project {project}",
        )
    except BaseException:
        redis.delete(advance_key(project))
        raise
    return True


def request_retrain(redis: Redis, project: int, set_number: int) -> bool:
    """Enqueue the ONE retraining for (project, set); False when it was already requested."""
    key = retrain_key(project, set_number)
    job_id = retrain_job_id(project, set_number)
    if not redis.set(key, job_id, nx=True):
        return False
    try:
        Queue(TRAINING_QUEUE, connection=redis).enqueue(
            retrain_job,
            project,
            set_number,
            job_id=job_id,
            job_timeout=RETRAIN_TIMEOUT_S,
            description=f"retrain project {project} through set {set_number}",
        )
    except BaseException:
        redis.delete(key)
        raise
    log.info("retraining of project %d through set %d enqueued", project, set_number)
    return True


def retrain_pending(redis: Redis, project: int, set_number: int) -> bool:
    return bool(redis.exists(retrain_key(project, set_number)))


# ---- the workbench a job runs with ------------------------------------------------------------


@dataclass
class Workbench:
    """Everything a job touches, built once per job from the settings."""

    settings: Settings
    labels: LabelConfig
    client: LabelStudioClient
    store: ModelStore
    redis: Redis
    auto_user: int
    http: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=30.0))

    @classmethod
    def open(cls, settings: Settings, redis: Redis) -> Workbench:
        url, key = settings.require_label_studio()
        client = LabelStudioClient.connect(url, key)
        return cls(
            settings=settings,
            labels=parse_label_config(settings.label_config_path.read_text()),
            client=client,
            store=ModelStore(settings.model_dir, pick_device(settings.device)),
            redis=redis,
            auto_user=client.current_user_id(),
        )

    def close(self) -> None:
        self.client.close()
        self.http.close()

    def fetch(self, size: int) -> Any:
        """Task image value -> (size, size) die codes, with the Label Studio token."""
        return partial(
            model_input,
            client=self.http,
            label_studio_url=self.settings.label_studio_url,
            api_key=self.settings.label_studio_api_key,
            size=size,
        )

    @contextmanager
    def project_lock(self, project: int) -> Iterator[None]:
        lock = self.redis.lock(f"wafermap:project:{project}:lock", timeout=RETRAIN_TIMEOUT_S)
        lock.acquire(blocking=True)
        try:
            yield
        finally:
            lock.release()


@contextmanager
def _workbench() -> Iterator[Workbench]:
    settings = Settings.from_env(os.environ)
    job = get_current_job()
    redis = job.connection if job is not None else Redis.from_url(settings.redis_url)
    bench = Workbench.open(settings, redis)
    try:
        yield bench
    finally:
        bench.close()


# ---- job entry points -------------------------------------------------------------------------


def advance_job(project: int) -> dict[str, Any]:
    """rq job: do the project's next step (see the module docstring)."""
    with _workbench() as bench:
        bench.redis.delete(advance_key(project))
        return advance(bench, project)


def retrain_job(project: int, set_number: int) -> dict[str, Any]:
    """rq job: retrain through `set_number`, serve the new version, open the next set."""
    with _workbench() as bench:
        try:
            outcome = retrain(bench, project, set_number)
        except BaseException:
            bench.redis.delete(retrain_key(project, set_number))
            raise
        outcome["next"] = advance(bench, project)
        return outcome


# ---- the steps ---------------------------------------------------------------------------------


def _open_set_predicted(bench: Workbench, project: int, open_set: int, version: str) -> bool:
    """Whether every wafer of the open set has a prediction of `version`: the mark the last
    pre-annotation left in Redis, else (no mark, e.g. new tasks came in) a listing of the set."""
    mark = bench.redis.hget(opened_key(project), str(open_set))
    if isinstance(mark, bytes) and mark.decode() == version:
        return True
    return all(
        any(p.get("model_version") == version for p in t.get("predictions") or [])
        for t in bench.client.tasks_of_set(project, open_set)
    )


def advance(bench: Workbench, project: int) -> dict[str, Any]:
    """One pass of the loop's decision; pre-annotating may finish a set and so ask to retrain."""
    with bench.project_lock(project):
        done: list[dict[str, Any]] = []
        for _ in range(2):
            card = bench.store.current_card()
            finished_through, open_set = loop_position(bench.client, project)
            predicted = (
                open_set is not None
                and card is not None
                and _open_set_predicted(bench, project, open_set, card.version)
            )
            step = decide(finished_through, open_set, predicted, trained_through(card))
            if step.action == "retrain" and step.set_number is not None:
                enqueued = request_retrain(bench.redis, project, step.set_number)
                done.append({"action": "retrain", "set": step.set_number, "enqueued": enqueued})
                break
            classifier = bench.store.load_current() if step.action == "open" else None
            if step.set_number is not None and classifier is not None:
                done.append(preannotate_set(bench, project, step.set_number, classifier))
                continue
            done.append({"action": "wait", "set": step.set_number})
            break
        return {"project": project, "steps": done}


def _prediction_items(
    predictions: Sequence[WaferPrediction], labels: LabelConfig, version: str
) -> list[dict[str, Any]]:
    """Label Studio prediction rows for the wafers that could be predicted."""
    return [
        {"task": p.task_id, **to_label_studio(p, labels, version)}
        for p in predictions
        if p.ok and p.task_id is not None
    ]


def _data_update(p: WaferPrediction, version: str) -> dict[str, Any]:
    if not p.ok:
        return {"route": p.route, "prediction_error": p.error, "model_version": version}
    return {
        "predicted": p.failure_type,
        "score": round(p.score or 0.0, 6),
        "least_confidence": round(p.least_confidence or 0.0, 6),
        "margin": round(p.margin or 0.0, 6),
        "entropy": round(p.entropy or 0.0, 6),
        "route": p.route,
        "model_version": version,
    }


def preannotate_set(
    bench: Workbench, project: int, set_number: int, classifier: WaferClassifier
) -> dict[str, Any]:
    """Predict every wafer of the set that lacks a prediction of this version, show the
    uncertainty in the task data, then accept the confident ones that nobody labelled."""
    started = time.perf_counter()
    version = classifier.card.version
    chosen: list[RoutingRule] = []

    def rule(probs: npt.NDArray[np.float64]) -> RoutingRule:
        chosen.append(serving_rule(bench.settings, classifier.card, probs))
        return chosen[-1]

    tasks = [
        t
        for t in bench.client.tasks_of_set(project, set_number)
        if not any(p.get("model_version") == version for p in t.get("predictions") or [])
    ]
    predictions = predict_tasks(
        tasks, classifier, bench.labels, rule, bench.fetch(classifier.card.image_size)
    )
    stored = bench.client.create_predictions(
        project, _prediction_items(predictions, bench.labels, version)
    )
    current = {t["id"]: t.get("data") or {} for t in tasks}

    def update(p: WaferPrediction) -> None:
        if p.task_id is not None:
            bench.client.update_task_data(
                p.task_id, _data_update(p, version), current=current.get(p.task_id)
            )

    with ThreadPoolExecutor(UPDATE_THREADS) as pool:
        list(pool.map(update, predictions))
    if stored:
        bench.client.set_model_version(project, version)
    # Read again right before accepting: never touch a task someone labelled meanwhile.
    accept = [
        t["id"]
        for t in bench.client.tasks_of_set(project, set_number, only_unlabelled=True)
        if (t.get("data") or {}).get("route") == Route.AUTO.value
        and (t.get("data") or {}).get("model_version") == version
        and any(p.get("model_version") == version for p in t.get("predictions") or [])
    ]
    bench.client.accept_predictions(project, accept, version)
    # Every wafer of the set was tried (unreadable ones are not tried again on every event).
    bench.redis.hset(opened_key(project), str(set_number), version)
    errors = [p.error for p in predictions if not p.ok]
    for message in errors[:20]:
        log.warning("set %d: %s", set_number, message)
    outcome = {
        "action": "open",
        "set": set_number,
        "model_version": version,
        "rule": chosen[-1].describe() if chosen else "",
        "predicted": stored,
        "auto_accepted": len(accept),
        "to_engineers": sum(p.route == Route.ENGINEER.value for p in predictions),
        "unreadable": len(errors),
        "seconds": round(time.perf_counter() - started, 2),
    }
    log.info("pre-annotated: %s", outcome)
    return outcome


@dataclass(frozen=True)
class TrainingExamples:
    """The annotated wafers as model inputs: die codes, class indices, task ids, and whether
    a person gave the label (an engineer, or the initial set's known labels)."""

    codes: npt.NDArray[np.uint8]
    classes: npt.NDArray[np.int64]
    task_ids: npt.NDArray[np.int64]
    by_person: npt.NDArray[np.bool_]
    skipped: dict[str, int]


def training_examples(
    bench: Workbench, tasks: Sequence[Mapping[str, Any]], size: int
) -> TrainingExamples:
    """Every annotated wafer; unreadable pictures and labels outside the labeling config are
    skipped and counted."""
    fetch = bench.fetch(size)
    codes: list[npt.NDArray[np.uint8]] = []
    classes: list[int] = []
    ids: list[int] = []
    by_person: list[bool] = []
    skipped: Counter[str] = Counter()
    for task in tasks:
        failure_type = label_of(task, bench.labels, bench.auto_user)
        if failure_type is None:
            continue
        if failure_type not in bench.labels.failure_types:
            skipped["unknown_failure_type"] += 1
            log.warning("task %s: unknown failure type %r skipped", task.get("id"), failure_type)
            continue
        try:
            picture = fetch((task.get("data") or {}).get(bench.labels.image_value, ""))
        except ImageError as exc:
            skipped["unreadable_picture"] += 1
            log.warning("task %s: %s", task.get("id"), exc)
            continue
        codes.append(picture)
        classes.append(bench.labels.failure_types.index(failure_type))
        ids.append(int(task["id"]))
        by_person.append(
            any(
                annotation_source(a, bench.auto_user) is not LabelSource.AUTO
                for a in _annotations(task)
            )
        )
    return TrainingExamples(
        codes=np.stack(codes) if codes else np.zeros((0, size, size), np.uint8),
        classes=np.asarray(classes, dtype=np.int64),
        task_ids=np.asarray(ids, dtype=np.int64),
        by_person=np.asarray(by_person, dtype=np.bool_),
        skipped=dict(skipped),
    )


def retrain(bench: Workbench, project: int, set_number: int) -> dict[str, Any]:
    """Train a new version on every annotated wafer, calibrate its routing threshold on a
    held-out part, store it atomically and serve it (the old versions stay)."""
    started = time.perf_counter()
    s = bench.settings
    current = bench.store.load_current()
    size = current.card.image_size if current is not None else s.image_size
    labelled = TaskFilter("total_annotations", FilterOperator.GREATER, "Number", 0)
    tasks = [t for t in bench.client.tasks(project, [labelled]) if _annotations(t)]
    examples = training_examples(bench, tasks, size)
    codes, classes, skipped = examples.codes, examples.classes, examples.skipped
    if len(codes) < 2:
        raise ValueError(
            f"project {project} has {len(codes)} usable labelled wafers; need at least 2"
        )
    n_classes = len(bench.labels.failure_types)
    seed = int(np.random.SeedSequence([project, set_number]).generate_state(1)[0])
    # Validation: a stable share of the wafers a PERSON labelled. Stable, so a warm-started
    # model never trained on them; persons only, so the model is not graded against labels
    # that an earlier model gave.
    held_out = stable_holdout(examples.task_ids, s.validation_fraction) & examples.by_person
    train, val = np.flatnonzero(~held_out), np.flatnonzero(held_out)
    if len(train) < 2:
        train, val = np.arange(len(codes)), np.zeros(0, dtype=np.intp)
    warm = (
        current is not None
        and current.card.backbone == s.backbone
        and current.card.failure_types == bench.labels.failure_types
    )
    network = (
        current.network
        if warm and current is not None
        else build_network(s.backbone, n_classes, seed, s.weights_path)
    )
    config = TrainConfig(epochs=s.epochs, seed=seed)
    report = train_network(
        network, codes[train], classes[train], n_classes, config, bench.store.device
    )
    version = bench.store.next_version(f"set{set_number}")
    card = ModelCard(
        version=version,
        failure_types=bench.labels.failure_types,
        image_size=size,
        backbone=s.backbone,
        logit_adjustment=tuple(logit_adjustment(classes[train], n_classes, config.balance)),
        training=config.to_dict()
        | {
            "trained_through_set": set_number,
            "project": project,
            "train_wafers": len(train),
            "validation_wafers": len(val),
            "warm_start": bool(warm),
            "route_measure": s.route_measure,
            "skipped": skipped,
            "train_seconds": round(report.seconds, 2),
        },
    )
    model = WaferClassifier(network=network, card=card, device=bench.store.device)
    metrics: dict[str, float] = {"train_wafers": float(len(train))}
    if len(val):
        probs = model.predict_proba(codes[val])
        correct = probs.argmax(axis=1) == classes[val]
        measure = Measure(s.route_measure)
        cal = calibrate(uncertainty(probs, measure), correct, measure, s.target_accuracy)
        card = dataclasses.replace(
            card,
            training={
                **card.training,
                "validation": {
                    "measure": measure.value,
                    "scores": [float(x) for x in uncertainty(probs, measure)],
                    "correct": [bool(x) for x in correct],
                },
            },
        )
        metrics |= {
            "validation_wafers": float(len(val)),
            "validation_accuracy": float(correct.mean()),
            "route_threshold": cal.rule.threshold,
            "target_accuracy": s.target_accuracy,
            "predicted_accuracy": cal.predicted_accuracy,
            "expected_engineer_ratio": cal.expected_engineer_ratio,
        }
    model = WaferClassifier(
        network=network, card=dataclasses.replace(card, metrics=metrics), device=bench.store.device
    )
    bench.store.publish(model)
    outcome = {
        "action": "retrain",
        "set": set_number,
        "model_version": version,
        "wafers": len(codes),
        "skipped": skipped,
        "validation_accuracy": metrics.get("validation_accuracy"),
        "rule": serving_rule(s, model.card).describe(),
        "seconds": round(time.perf_counter() - started, 2),
    }
    log.info("retrained: %s", outcome)
    return outcome
