"""Retraining: a new model version from every annotated wafer so far. Layer L2.

Engineer, auto and known labels all train; the routing threshold is calibrated on a stable
held-out share of the wafers a PERSON labelled. The new version is stored atomically beside
the old ones and served; a retraining that dies before `ModelStore.publish` leaves CURRENT as
it was.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from rq import get_current_job

from backend.calibration import calibrate
from backend.classifier import ModelCard, WaferClassifier, build_network
from backend.images import ImageError
from backend.labelstudio import FilterOperator, TaskFilter
from backend.loop_state import (
    annotations_of,
    label_of,
    labelled_by_person,
    serving_rule,
)
from backend.splits import stable_holdout
from backend.training import TrainConfig, logit_adjustment, train_network
from backend.uncertainty import Measure, uncertainty
from backend.workbench import Workbench

log = logging.getLogger(__name__)


def with_validation(
    card: ModelCard,
    probs: npt.NDArray[np.float64],
    truth: npt.NDArray[np.int64],
    measure: Measure,
    target_accuracy: float,
) -> tuple[ModelCard, dict[str, float]]:
    """The card with the model's scores on its held-out, person-labelled wafers stored (the
    serving rule calibrates each set to them) and the calibration figures for its metrics."""
    correct = probs.argmax(axis=1) == truth
    scores = uncertainty(probs, measure)
    cal = calibrate(scores, correct, measure, target_accuracy)
    validation = {
        "measure": measure.value,
        "scores": [float(x) for x in scores],
        "correct": [bool(x) for x in correct],
    }
    card = dataclasses.replace(card, training={**card.training, "validation": validation})
    return card, {
        "validation_wafers": float(len(truth)),
        "validation_accuracy": float(correct.mean()),
        "route_threshold": cal.rule.threshold,
        "target_accuracy": target_accuracy,
        "predicted_accuracy": cal.predicted_accuracy,
        "expected_engineer_ratio": cal.expected_engineer_ratio,
    }


def report_stage(stage: str) -> None:
    """Show the running rq job's stage in its meta (``job.meta["stage"]``: "training",
    "publishing"), for dashboards and for tests that stop a worker at a known point."""
    job = get_current_job()
    if job is not None:
        job.meta["stage"] = stage
        job.save_meta()


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
        by_person.append(labelled_by_person(task, bench.auto_user))
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
    tasks = [t for t in bench.client.tasks(project, [labelled]) if annotations_of(t)]
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
    report_stage("training")
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
        card, calibration = with_validation(
            card, probs, classes[val], Measure(s.route_measure), s.target_accuracy
        )
        metrics |= calibration
    model = WaferClassifier(
        network=network, card=dataclasses.replace(card, metrics=metrics), device=bench.store.device
    )
    report_stage("publishing")
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
