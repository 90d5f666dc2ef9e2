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
from backend.classifier import WaferClassifier, build_network
from backend.encoding import encode_wafers
from backend.images import ImageError, picture_reader
from backend.job_resources import JobResources
from backend.label_reads import read_labelled_tasks
from backend.loop_state import (
    kept_annotations,
    label_of,
    labelled_by_person,
    serving_rule,
    set_number_of,
    trained_through,
)
from backend.model_card import HeldOutScores, ModelCard
from backend.predictions import wafer_probabilities
from backend.replay import RetrainPolicy, plan_retraining
from backend.set_audits import record_audits, sampled_wafers
from backend.splits import stable_holdout, unrouted_holdout, wafer_key
from backend.training import TrainConfig, logit_adjustment, train_bounded, train_network
from backend.uncertainty import Measure, mean_over_views, uncertainty

log = logging.getLogger(__name__)

#: Peak learning rate of a retraining that continues the served model, as a share of a fresh
#: training's. Measured on the full study (`simulate --retrain bounded`, wafercnn): at 1.0 the
#: continued model's held-out loss only rose (0.133 -> 0.230) and early stopping kept the old
#: weights; at 0.1 it held or improved a little.
CONTINUED_LEARNING_RATE_SCALE = 0.1


def with_validation(
    card: ModelCard,
    probs: npt.NDArray[np.float64],
    truth: npt.NDArray[np.int64],
    measure: Measure,
    target_accuracy: float,
) -> tuple[ModelCard, dict[str, float]]:
    """The card with the model's scores on its held-out, person-labelled wafers stored (the
    serving rule calibrates each set to them) and the calibration figures for its metrics.
    `probs` are (n, k), or (views, n, k) for a measure of several drawings."""
    correct = mean_over_views(probs)[0].argmax(axis=1) == truth
    scores = uncertainty(probs, measure)
    cal = calibrate(scores, correct, measure, target_accuracy)
    validation = HeldOutScores(
        measure=measure.value,
        scores=tuple(float(x) for x in scores),
        correct=tuple(bool(x) for x in correct),
    )
    card = dataclasses.replace(card, validation=validation)
    return card, {
        "validation_wafers": float(len(truth)),
        "validation_accuracy": float(correct.mean()),
        "route_threshold": cal.rule.threshold,
        "target_accuracy": target_accuracy,
        "predicted_accuracy": cal.predicted_accuracy,
        "expected_engineer_ratio": cal.expected_engineer_ratio,
    }


#: How sure a retrained model must be of another failure type before a person's label of a wafer
#: it never trained on is listed as suspect.
SUSPECT_PROBABILITY = 0.9


def suspect_labels(
    probs: npt.NDArray[np.float64], truth: npt.NDArray[np.int64], min_probability: float
) -> npt.NDArray[np.intp]:
    """Indices of the wafers whose label the model calls another failure type with probability
    at least `min_probability` (probs (n, k) or (views, n, k))."""
    mean = mean_over_views(probs)[0]
    best = mean.argmax(axis=1)
    sure = mean[np.arange(len(best)), best] >= min_probability
    return np.flatnonzero(sure & (best != truth)).astype(np.intp)


def mark_suspect_labels(
    resources: JobResources,
    task_ids: npt.NDArray[np.int64],
    probs: npt.NDArray[np.float64],
    truth: npt.NDArray[np.int64],
    version: str,
) -> int:
    """Write the model's failure type, its probability and the model `version` into the task
    data of each held-out, person-labelled wafer it confidently disagrees with (the "Suspect
    labels" tab lists them; a mark stays until a later model marks the wafer again); returns
    how many. One read and one write a wafer: they are few (under 1% of the held-out
    wafers of a 97%-accurate model at 0.9)."""
    mean = mean_over_views(probs)[0]
    found = suspect_labels(probs, truth, SUSPECT_PROBABILITY)
    names = resources.labels.failure_types
    for i in found.tolist():
        resources.check_lock("marking suspect labels")
        best = int(mean[i].argmax())
        resources.client.update_task_data(
            int(task_ids[i]),
            {
                "suspect_label": names[best],
                "suspect_probability": round(float(mean[i, best]), 4),
                "suspect_model_version": version,
            },
        )
    if len(found):
        log.info("%d person labels are suspect: see the Suspect labels tab", len(found))
    return len(found)


def report_stage(stage: str) -> None:
    """Show the running rq job's stage in its meta (``job.meta["stage"]``: "training",
    "publishing"), for dashboards and for tests that stop a worker at a known point."""
    job = get_current_job()
    if job is not None:
        job.meta["stage"] = stage
        job.save_meta()


#: The source name of tasks that carry no wafer identity of their own: their task id stands in.
TASK_ID_SOURCE = "label-studio-task"


def holdout_key(task: Mapping[str, Any]) -> int:
    """What the stable hold-out hashes for a task: its wafer's identity (`data.source`,
    `data.wafer_id`, as `import-sets`/`import-wafers` write them), so the offline `train` and
    the worker hold out the same wafers without asking Label Studio, across re-imports. A task
    without them is keyed by its task id."""
    data = task.get("data") or {}
    source, wafer_id = data.get("source"), data.get("wafer_id")
    if isinstance(source, str) and isinstance(wafer_id, int) and not isinstance(wafer_id, bool):
        return wafer_key(source, wafer_id)
    return wafer_key(TASK_ID_SOURCE, int(task["id"]))


@dataclass(frozen=True)
class TrainingExamples:
    """The annotated wafers as model inputs: die codes, class indices, task ids, and whether
    a person gave the label (an engineer, or the initial set's known labels)."""

    codes: npt.NDArray[np.uint8]
    classes: npt.NDArray[np.int64]
    task_ids: npt.NDArray[np.int64]
    #: What the stable hold-out hashes (`holdout_key`).
    holdout_keys: npt.NDArray[np.int64]
    by_person: npt.NDArray[np.bool_]
    skipped: dict[str, int]
    #: `data.set` of each wafer's task (0 when it has none).
    set_numbers: npt.NDArray[np.int64]


def training_examples(
    resources: JobResources, tasks: Sequence[Mapping[str, Any]], size: int
) -> TrainingExamples:
    """Every annotated wafer, by task id; die maps from the project's wafer store, pictures
    read back only for tasks without an entry there. Unreadable pictures and labels outside the
    labeling config are skipped and counted."""
    skipped: Counter[str] = Counter()
    labelled: dict[int, tuple[int, bool, Mapping[str, Any]]] = {}
    for task in tasks:
        failure_type = label_of(task, resources.labels, resources.auto_user)
        if failure_type is None:
            continue
        if failure_type not in resources.labels.failure_types:
            skipped["unknown_failure_type"] += 1
            log.warning("task %s: unknown failure type %r skipped", task.get("id"), failure_type)
            continue
        labelled[int(task["id"])] = (
            resources.labels.failure_types.index(failure_type),
            labelled_by_person(task, resources.auto_user),
            task,
        )
    sets = {n for _, _, t in labelled.values() if (n := set_number_of(t)) is not None}
    stored = resources.wafers.lookup(sets, labelled, resources.labels.failure_types)
    parts = [encode_wafers(stored.maps, size)]
    ids = [int(t) for t in stored.task_ids]
    missing = sorted(set(labelled) - set(ids))
    if missing:
        log.info(
            "%d labelled wafers are not in the wafer store: reading their pictures", len(missing)
        )
        fetch = picture_reader(resources.settings, size)
        for task_id in missing:
            data = labelled[task_id][2].get("data") or {}
            try:
                picture = fetch(data.get(resources.labels.image_value, ""))
            except ImageError as exc:
                skipped["unreadable_picture"] += 1
                log.warning("task %s: %s", task_id, exc)
                continue
            parts.append(picture[None])
            ids.append(task_id)
    return TrainingExamples(
        codes=np.concatenate(parts) if ids else np.zeros((0, size, size), np.uint8),
        classes=np.asarray([labelled[i][0] for i in ids], dtype=np.int64),
        task_ids=np.asarray(ids, dtype=np.int64),
        holdout_keys=np.asarray([holdout_key(labelled[i][2]) for i in ids], dtype=np.int64),
        by_person=np.asarray([labelled[i][1] for i in ids], dtype=np.bool_),
        skipped=dict(skipped),
        set_numbers=np.asarray([set_number_of(labelled[i][2]) or 0 for i in ids], dtype=np.int64),
    )


def retrain(resources: JobResources, project: int, set_number: int) -> dict[str, Any]:
    """Train a new version on every annotated wafer, calibrate its routing threshold on a
    held-out part, store it atomically and serve it (the old versions stay)."""
    started = time.perf_counter()
    s = resources.settings
    current = resources.store.load_current()
    size = current.card.image_size if current is not None else s.image_size
    report_stage("listing labelled wafers")
    read = read_labelled_tasks(
        resources.client,
        resources.wafers,
        s.model_dir,
        project,
        set_number,
        resources.labels.image_value,
    )
    tasks = [t for t in read.tasks if kept_annotations(t)]
    audits = record_audits(
        resources.wafers, tasks, resources.labels, resources.auto_user, s.target_accuracy
    )
    examples = training_examples(resources, tasks, size)
    codes, classes, skipped = examples.codes, examples.classes, examples.skipped
    if len(codes) < 2:
        raise ValueError(
            f"project {project} has {len(codes)} usable labelled wafers; need at least 2"
        )
    n_classes = len(resources.labels.failure_types)
    seed = int(np.random.SeedSequence([project, set_number]).generate_state(1)[0])
    # Validation: a stable share of the wafers a PERSON labelled. Stable, so a warm-started
    # model never trained on them; persons only, so the model is not graded against labels
    # that an earlier model gave.
    held_out = stable_holdout(examples.holdout_keys, s.validation_fraction) & examples.by_person
    train, val = np.flatnonzero(~held_out), np.flatnonzero(held_out)
    if len(train) < 2:
        train, val = np.arange(len(codes)), np.zeros(0, dtype=np.intp)
    warm = (
        current is not None
        and current.card.backbone == s.backbone
        and current.card.failure_types == resources.labels.failure_types
    )
    network = (
        current.network
        if warm and current is not None
        else build_network(s.backbone, n_classes, seed, s.weights_path)
    )
    config = TrainConfig(epochs=s.epochs, seed=seed)
    report_stage("training")
    # Bounded retraining (`backend.replay`): a model that continues the served one trains on
    # the wafers labelled since it was trained plus a class-balanced replay of earlier ones,
    # with a compute budget that grows with the new wafers only, and early stopping on the
    # person-labelled hold-out. A fresh network trains on everything.
    since = trained_through(current.card) if warm and current is not None else None
    plan = (
        plan_retraining(
            classes,
            examples.by_person,
            examples.set_numbers > since,
            examples.task_ids,
            RetrainPolicy(
                samples_per_new_wafer=float(s.epochs),
                validation_fraction=s.validation_fraction,
                learning_rate_scale=CONTINUED_LEARNING_RATE_SCALE,
            ),
            np.random.default_rng(seed),
        )
        if since is not None
        else None
    )
    bounded = plan is not None and plan.new >= 2
    if plan is not None and bounded:
        report, adjust = train_bounded(
            network, codes, classes, plan, n_classes, config, resources.store.device
        )
        train = plan.train  # val stays the whole stable person hold-out (calibration)
    else:
        report = train_network(
            network, codes[train], classes[train], n_classes, config, resources.store.device
        )
        adjust = logit_adjustment(classes[train], n_classes, config.balance)
    version = resources.store.next_version(f"set{set_number}")
    card = ModelCard(
        version=version,
        failure_types=resources.labels.failure_types,
        image_size=size,
        backbone=s.backbone,
        logit_adjustment=tuple(float(a) for a in adjust),
        trained_through_set=set_number,
        project=project,
        route_measure=s.route_measure,
        training=config.to_dict()
        | {
            "samples": report.samples,
            "bounded": bounded,
            "train_wafers": len(train),
            "validation_wafers": len(val),
            "warm_start": bool(warm),
            "skipped": skipped,
            "train_seconds": round(report.seconds, 2),
        },
    )
    model = WaferClassifier(network=network, card=card, device=resources.store.device)
    metrics: dict[str, float] = {"train_wafers": float(len(train))}
    # Routing is calibrated on the held-out wafers of sets persons labelled completely when
    # there are enough of them (`backend.splits.unrouted_holdout`): a routed set's engineer
    # labels are its most uncertain wafers and would make every later cut too cautious.
    val_mask = np.zeros(len(codes), dtype=np.bool_)
    val_mask[val] = True
    fair, unrouted = unrouted_holdout(
        val_mask,
        examples.by_person,
        examples.set_numbers,
        sampled=sampled_wafers(resources.wafers, examples.task_ids),
    )
    calibration_wafers = np.flatnonzero(fair)
    if len(calibration_wafers):
        probs = wafer_probabilities(model, codes[calibration_wafers], s.route_measure)
        card, calibration = with_validation(
            card, probs, classes[calibration_wafers], Measure(s.route_measure), s.target_accuracy
        )
        metrics["suspect_labels"] = float(
            mark_suspect_labels(
                resources,
                examples.task_ids[calibration_wafers],
                probs,
                classes[calibration_wafers],
                version,
            )
        )
        card = dataclasses.replace(
            card,
            training={
                **card.training,
                "calibration_wafers": "random wafers" if unrouted else "all person labels",
            },
        )
        metrics |= calibration
    model = WaferClassifier(
        network=network,
        card=dataclasses.replace(card, metrics=metrics),
        device=resources.store.device,
    )
    report_stage("publishing")
    served = resources.store.current_card()
    started_from = current.card.version if current is not None else None
    if served is not None and served.version != started_from:
        through = trained_through(served)
        if through is not None and through >= set_number:
            # Another version that learnt this set was served while this one trained (ops's
            # offline `train`, typically, while the history was still being imported): it
            # stays served, and this retraining is dropped rather than put over it.
            log.warning(
                "retraining of project %d through set %d dropped: %s (trained through set %d) "
                "was published meanwhile and stays served",
                project,
                set_number,
                served.version,
                through,
            )
            return {
                "action": "retrain",
                "set": set_number,
                "dropped": f"{served.version} was published meanwhile",
                "model_version": served.version,
            }
    resources.store.publish(model)
    outcome = {
        "action": "retrain",
        "set": set_number,
        "model_version": version,
        "wafers": len(codes),
        "skipped": skipped,
        "label_read": read.summary(),
        "validation_accuracy": metrics.get("validation_accuracy"),
        "audits": [a.summary() for a in audits if a.set_number == set_number],
        "rule": serving_rule(s, model.card).describe(),
        "seconds": round(time.perf_counter() - started, 2),
    }
    log.info("retrained: %s", outcome)
    return outcome
