"""Pre-annotation of a wafer set with the served model, and the auto-accept step. Layer L2.

Every wafer of the set that lacks a prediction of the served version gets one, whose score is
how sure the model is by the routing measure (Label Studio's `predictions_score` column: the
engineer queue sorts by it, most uncertain first); the confident ones that nobody labelled are
then accepted as the backend's annotations (`accept_confident`), exactly once per wafer
whatever Label Studio stored meanwhile. All of it in bulk: die maps from the project's wafer
store, one `import_predictions` call per 2,000 wafers, one accept action per set.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from backend.audit import cautious_target, draw_audit, latest_breach
from backend.classifier import WaferClassifier
from backend.encoding import encode_wafers
from backend.images import picture_reader
from backend.job_resources import JobResources
from backend.label_config import LabelConfig
from backend.labelstudio import (
    BATCHED_PREDICTION_IMPORT_FLAG,
    FilterOperator,
    LabelStudioClient,
    TaskFilter,
    not_predicted_by,
    score_at_least,
    set_filter,
    unlabelled_filter,
)
from backend.loop_keys import opened_key
from backend.loop_state import LabelSource, label_sources, route_measure, serving_rule
from backend.predictions import (
    WaferPrediction,
    check_failure_types,
    predict_codes,
    read_pictures,
    to_label_studio,
)
from backend.reconcile import repair_label_counts
from backend.routing import Route, RoutingRule
from backend.settings import Settings
from backend.uncertainty import Measure
from backend.wafer_store import SetRouting

log = logging.getLogger(__name__)

#: Predictions sent per `import_predictions` request.
PREDICTION_CHUNK = 2000


def _error_data(p: WaferPrediction, version: str) -> dict[str, Any]:
    """Task data of a wafer whose picture could not be read: the Unreadable tab's columns, and
    `model_version` so that the wafer counts as tried (`backend.job_resources.untried_wafers`)."""
    return {"route": p.route, "prediction_error": p.error, "model_version": version}


def _pending_wafers(
    resources: JobResources, project: int, set_number: int, version: str
) -> list[int]:
    """Task ids of the set's wafers that `version` has not tried: no prediction of it, and not
    marked unreadable by it (ids only: no picture leaves Label Studio)."""
    unpredicted = [set_filter(set_number), not_predicted_by(version)]
    pending = resources.client.task_ids(project, unpredicted)
    if not pending:
        return []
    tried = TaskFilter("data.model_version", FilterOperator.EQUAL, "String", version)
    unreadable = set(resources.client.task_ids(project, [*unpredicted, tried]))
    return [t for t in pending if t not in unreadable]


def _codes_from_pictures(
    resources: JobResources,
    project: int,
    set_number: int,
    version: str,
    wanted: set[int],
    classifier: WaferClassifier,
) -> tuple[list[int], list[npt.NDArray[np.uint8]], list[WaferPrediction]]:
    """Die codes of the `wanted` tasks read back from their pictures (tasks imported without
    the wafer store): (task ids, codes, unreadable ones)."""
    tasks = [
        t
        for t in resources.client.tasks(
            project, [set_filter(set_number), not_predicted_by(version)]
        )
        if int(t["id"]) in wanted
    ]
    fetch = picture_reader(resources.settings, classifier.card.image_size)
    ids: list[int] = []
    codes: list[npt.NDArray[np.uint8]] = []
    failed: list[WaferPrediction] = []
    for task, result in zip(
        tasks, read_pictures(tasks, classifier, resources.labels, fetch), strict=True
    ):
        if isinstance(result, WaferPrediction):
            failed.append(result)
        else:
            ids.append(int(task["id"]))
            codes.append(result)
    return ids, codes, failed


def _route_by_cut(p: WaferPrediction, cut: float | None) -> WaferPrediction:
    """`p` routed by a kept score cut: auto exactly when its score is at least `cut` (the
    comparison Label Studio's `predictions_score` filter makes in the accept step)."""
    auto = cut is not None and p.score is not None and p.score >= cut
    return replace(p, route=Route.AUTO.value if auto else Route.ENGINEER.value)


def _blind(p: WaferPrediction, cut: float | None) -> WaferPrediction:
    """An audit wafer: routed to engineers, scored one float step below the set's cut (so the
    accept step never takes it and the engineer queue lists it after the uncertain wafers)."""
    score = None if cut is None else float(np.nextafter(cut, -np.inf))
    return replace(p, route=Route.ENGINEER.value, score=score)


def _stored_prediction(
    p: WaferPrediction, labels: LabelConfig, version: str, blind: bool
) -> dict[str, Any]:
    """What Label Studio stores for a wafer: its prediction, or for an audit wafer a prediction
    with no label in it (nothing pre-selected for the engineer)."""
    stored = to_label_studio(p, labels, version)
    return {**stored, "result": []} if blind and "result" in stored else stored


def routing_settings(resources: JobResources, set_number: int) -> Settings:
    """The settings a set is routed with: the project's, with half the error budget while the
    newest finished audit of an earlier set shows the promise broken (`backend.audit`)."""
    s = resources.settings
    earlier = [a for a in resources.wafers.audits() if a.set_number < set_number]
    breach = latest_breach(earlier)
    if breach is None:
        return s
    target = cautious_target(s.target_accuracy)
    log.warning(
        "set %d is routed cautiously (target %.4f instead of %.4f): the audit of set %d put "
        "its labeling accuracy at %.4f at most",
        set_number,
        target,
        s.target_accuracy,
        breach.set_number,
        breach.labeling_interval[1],
    )
    return dataclasses.replace(s, target_accuracy=target)


def audit_rng(project: int, set_number: int, version: str) -> np.random.Generator:
    """The random draw of a set's audit sample: the same for a project, set and model version."""
    return np.random.default_rng([project, set_number, zlib.crc32(version.encode())])


def preannotate_set(
    resources: JobResources, project: int, set_number: int, classifier: WaferClassifier
) -> dict[str, Any]:
    """Predict every wafer of the set that `version` has not tried, store the predictions with
    their scores (Label Studio's `predictions_score`: the engineer queue's order), then accept
    the confident ones that nobody labelled.

    Die maps come from the project's wafer store by task id (`backend.wafer_store`); only wafers
    without an entry there are read back from their pictures. No task data is written except
    for unreadable pictures.

    The set's routing (model, rule, score cut, counts) is decided by the first pass of a model
    version over the set and kept in the wafer store, once (`WaferStore.keep_routing`), before
    any prediction is stored. A later pass of the same version (a catch-up of wafers added
    without their TASKS_CREATED webhook, or a re-run after a crash) scores its wafers by the
    kept routing's measure and routes them by its kept cut: a handful of new wafers never
    calibrate a cut of their own, and the set's routing is never rewritten. The accept step
    selects the wafers by `score >= cut` inside Label Studio.

    Between steps the job checks that it still holds the project lock (`check_lock`). After
    the predictions are stored, annotation counts that the import's recount got wrong are
    repaired (`backend.reconcile.repair_label_counts`); a Label Studio without its batched
    prediction import is reported in the log, loudly, and in the outcome.
    """
    started = time.perf_counter()
    version = classifier.card.version
    check_failure_types(classifier, resources.labels)
    pending = _pending_wafers(resources, project, set_number, version)
    stored = resources.wafers.lookup([set_number], pending, classifier.card.failure_types)
    task_ids = [int(t) for t in stored.task_ids]
    codes = encode_wafers(stored.maps, classifier.card.image_size)
    missing = set(pending) - set(task_ids)
    failed: list[WaferPrediction] = []
    if missing:
        log.info(
            "set %d: %d wafers are not in the wafer store; reading their pictures",
            set_number,
            len(missing),
        )
        more_ids, more_codes, failed = _codes_from_pictures(
            resources, project, set_number, version, missing, classifier
        )
        task_ids += more_ids
        if more_codes:
            codes = np.concatenate([codes, np.stack(more_codes)])
    kept = resources.wafers.routing(set_number, version)
    if kept is not None and not kept.decided:
        kept = None  # a first pass that routed no wafer (every picture unreadable)
    settings = routing_settings(resources, set_number) if kept is None else resources.settings
    chosen: list[RoutingRule] = []

    def rule(probs: npt.NDArray[np.float64]) -> RoutingRule:
        serving = serving_rule(settings, classifier.card, probs)
        if kept is None:
            chosen.append(serving)
        else:
            # The set's own measure, and no routing here: the kept cut routes (below).
            measure = Measure(kept.measure) if kept.measure else serving.measure
            chosen.append(RoutingRule(measure, math.inf))
        return chosen[-1]

    measure = (
        Measure(kept.measure)
        if kept is not None and kept.measure
        else route_measure(settings, classifier.card)
    )
    predicted: list[WaferPrediction] = []
    cut: float | None = None
    steps = {"read": time.perf_counter() - started}
    if task_ids:
        predicted, routed = predict_codes(
            task_ids,
            codes,
            classifier,
            rule,
            progress=f"predicting set {set_number}",
            measure=measure,
        )
        cut = routed.cut
    if kept is not None:
        cut = kept.cut
        predicted = [_route_by_cut(p, cut) for p in predicted]
    # The audit sample: drawn by the first pass, kept with the routing; later passes only
    # blind the audit wafers they predict again.
    audit: dict[int, str] = dict(kept.audit) if kept is not None else {}
    sampled: tuple[int, ...] = kept.sampled if kept is not None else ()
    if kept is None and predicted:
        draw = draw_audit(
            [p.route == Route.AUTO.value for p in predicted],
            settings.audit_fraction,
            settings.audit_min,
            audit_rng(project, set_number, version),
        )
        audit = {int(predicted[i].task_id): str(predicted[i].failure_type) for i in draw.audit}
        sampled = tuple(int(predicted[i].task_id) for i in draw.sampled)
    predicted = [_blind(p, cut) if p.task_id in audit else p for p in predicted]
    auto = sum(p.route == Route.AUTO.value for p in predicted)
    # The routing is kept before any prediction is stored: a crash after the predictions
    # leaves a set whose accept step the next advance finishes with this cut.
    resources.check_lock(f"keeping the routing of set {set_number}")
    if kept is None:
        first = SetRouting(
            set_number=set_number,
            model_version=version,
            rule=chosen[-1].describe() if chosen else "",
            cut=cut,
            auto=auto,
            engineer=len(predicted) - auto,
            unreadable=len(failed),
            measure=chosen[-1].measure.value if chosen else None,
            audit=audit,
            sampled=sampled,
        )
        if predicted or resources.wafers.routing(set_number, version) is None:
            resources.wafers.keep_routing(first)
    batched = None
    if predicted:
        batched = resources.client.prediction_import_batched(project)
        if batched is False:
            log.warning(
                "LABEL STUDIO RUNS WITHOUT %s: each prediction import recounts the annotations "
                "of every task of project %d without a lock, and a label saved meanwhile is "
                "counted as missing (its set would never finish). The backend repairs such "
                "counts after each import and on every reconcile, but set the flag to true in "
                "Label Studio's environment (docker-compose.yml does): it also stores "
                "predictions about 5 times faster",
                BATCHED_PREDICTION_IMPORT_FLAG,
                project,
            )
    steps["predict"] = time.perf_counter() - started - sum(steps.values())
    resources.check_lock(f"storing the predictions of set {set_number}")
    stored_count = resources.client.create_predictions(
        project,
        [
            {
                "task": p.task_id,
                **_stored_prediction(p, resources.labels, version, p.task_id in audit),
            }
            for p in predicted
        ],
        chunk_size=PREDICTION_CHUNK,
    )
    recounted = (
        repair_label_counts(resources.client, project, resources.labels, resources.check_lock)
        if stored_count
        else []
    )
    for p in failed:
        if p.task_id is not None:
            resources.check_lock(f"marking the unreadable wafers of set {set_number}")
            resources.client.update_task_data(p.task_id, _error_data(p, version))
    if stored_count:
        resources.check_lock(f"pointing the project at {version}")
        resources.client.set_model_version(project, version)
    steps["store"] = time.perf_counter() - started - sum(steps.values())
    accepted = accept_confident(
        resources.client,
        project,
        set_number,
        version,
        resources.auto_user,
        cut,
        check=resources.check_lock,
    )
    steps["accept"] = time.perf_counter() - started - sum(steps.values())
    # Every wafer of the set was tried (unreadable ones are not tried again on every event).
    resources.redis.hset(opened_key(project), str(set_number), version)
    for p in failed[:20]:
        log.warning("set %d: %s", set_number, p.error)
    outcome = {
        "action": "open",
        "set": set_number,
        "model_version": version,
        "routing": "new" if kept is None else "kept",
        "rule": kept.rule if kept is not None else (chosen[-1].describe() if chosen else ""),
        "score_cut": cut,
        "predicted": stored_count,
        "from_wafer_store": len(stored),
        "auto_accepted": accepted.accepted,
        "surplus_predictions_deleted": accepted.predictions_deleted,
        "auto_labels_removed": accepted.annotations_deleted,
        "to_engineers": len(predicted) - auto,
        "audit_wafers": len(audit),
        "target_accuracy": settings.target_accuracy,
        "unreadable": len(failed),
        "batched_prediction_import": batched,
        "label_counts_repaired": recounted,
        "seconds": round(time.perf_counter() - started, 2),
        "step_seconds": {step: round(seconds, 2) for step, seconds in steps.items()},
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


def auto_routed(set_number: int, cut: float) -> list[TaskFilter]:
    """The set's wafers routed auto by the project's model version: prediction score (Label
    Studio's `predictions_score`, which counts only predictions of the project's model version)
    at least the set's `cut` (see `backend.routing.scored_routes`)."""
    return [set_filter(set_number), score_at_least(cut)]


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
    client: LabelStudioClient, project: int, set_number: int, cut: float | None
) -> int:
    """How many of the set's wafers routed auto (score >= `cut`) still have no annotation (one
    small count query): more than 0 after a pre-annotation means its accept step did not finish
    (e.g. Label Studio was unreachable), and `accept_confident` should run again."""
    if cut is None:
        return 0
    return client.count_tasks(project, [*auto_routed(set_number, cut), unlabelled_filter()])


def accept_confident(
    client: LabelStudioClient,
    project: int,
    set_number: int,
    version: str,
    auto_user: int,
    cut: float | None,
    *,
    check: Callable[[str], None] | None = None,
) -> AcceptOutcome:
    """Accept the set's auto-routed wafers that nobody labelled, each exactly once.

    The project's model version must be `version` (pre-annotation points it there): Label
    Studio's prediction score then counts only `version`'s predictions.

    1. List the set's unlabelled wafers that hold two or more predictions (a Data Manager
       filter: normally few) and delete their surplus predictions (`surplus_predictions`):
       each keeps one, of `version`, so Label Studio's accept action (one annotation per
       matching prediction) makes at most one per wafer.
    2. Send the accept action with Data Manager filters instead of task ids: the set, score at
       least `cut` (the routing's boundary, `backend.routing.scored_routes`), and no
       annotation. Label Studio evaluates them inside the action's own query, so a wafer an
       engineer labelled at any time before is skipped by Label Studio itself, and no listing
       of the set is needed. A wafer that gained a second prediction of `version` with a lower
       score after step 1 averages below the cut and waits for the next run.
    3. `repair_auto_labels`: whatever slipped through a window too narrow for 1-2 (a
       `/predict` answer of `version` stored between 1 and 2, an engineer's label stored
       while the action ran) is deleted, leaving at most one auto label per wafer and none
       after a person's.

    Idempotent: a run after a failure (Label Studio unreachable, the action applied but its
    answer lost) finds the accepted wafers labelled and accepts only the rest. A failure
    raises `LabelStudioError` naming the call. `accepted` is counted as the routed-auto
    unlabelled wafers before the action minus those after (engineers labelling meanwhile
    shift it). `cut` None (every wafer to engineers) accepts nothing.

    `check` (the job's project-lock check) runs before each of the three writes.

    Measured (Label Studio 1.23.2 on PostgreSQL 15, 2 cores): the action on a set of 17,295
    wafers accepted 15,219 in 25.2 s (600 wafers/s).
    """

    def step(what: str) -> None:
        if check is not None:
            check(f"{what} of set {set_number}")

    several = TaskFilter("total_predictions", FilterOperator.GREATER, "Number", 1)
    crowded = client.tasks(project, [set_filter(set_number), unlabelled_filter(), several])
    surplus = [i for t in crowded for i in surplus_predictions(t, version)]
    if surplus:
        log.info("set %d: deleting %d surplus predictions", set_number, len(surplus))
        step("deleting surplus predictions")
    deleted = client.delete_predictions(surplus)
    before = unaccepted_wafers(client, project, set_number, cut)
    if before and cut is not None:
        step("the accept step")
        client.accept_predictions_where(project, auto_routed(set_number, cut), version)
    after = unaccepted_wafers(client, project, set_number, cut) if before else 0
    step("removing misplaced auto labels")
    removed = repair_auto_labels(client, project, set_number, auto_user)
    return AcceptOutcome(
        accepted=before - after, predictions_deleted=deleted, annotations_deleted=removed
    )
