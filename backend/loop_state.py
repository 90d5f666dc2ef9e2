"""The loop's decisions, from what Label Studio holds and what the served model learnt.
Layer L0 (pure: it reads `backend.model_card.ModelCard`s).

The loop, per project: set 0 (the initial set) is imported with known labels; the OPEN set is
the lowest-numbered set that still has a wafer without an annotation. Only the open set is
pre-annotated and auto-accepted; later sets wait for the model that the open set will train,
so every set is routed by a model that learnt from all sets before it.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from backend.calibration import calibrate, promise_cut
from backend.label_config import LabelConfig
from backend.routing import RoutingRule
from backend.settings import Settings
from backend.uncertainty import Measure, uncertainty

if TYPE_CHECKING:  # the card only: deciding needs no torch
    from backend.model_card import ModelCard


class LabelSource(StrEnum):
    """Who labelled a wafer."""

    KNOWN = "known"  # imported with the initial set
    AUTO = "auto"  # accepted by the backend from its prediction
    ENGINEER = "engineer"  # labelled by a person in Label Studio


def set_number_of(task: Mapping[str, Any]) -> int | None:
    """The task's `data.set` as a number (None when it has none)."""
    data = task.get("data") or {}
    value = data.get("set") if isinstance(data, Mapping) else None
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def kept_annotations(task: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The task's annotations that were not cancelled (skipped)."""
    return [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]


def _result_key(result: Any) -> list[tuple[str, str]]:
    """A result as (from_name, value) pairs, blind to item ids, origin and order."""
    items = result if isinstance(result, list) else []
    return sorted(
        (str(item.get("from_name")), json.dumps(item.get("value"), sort_keys=True))
        for item in items
        if isinstance(item, Mapping)
    )


def edited_by_person(
    annotation: Mapping[str, Any],
    auto_user: int,
    predictions: Sequence[Mapping[str, Any]] = (),
) -> bool:
    """Whether someone other than the backend changed this annotation after it was made.

    Label Studio 1.23.2 keeps `completed_by` when an engineer edits an annotation and sets
    only `updated_by` (verified on the server), so: `updated_by` names another user, or the
    result differs from its parent prediction's (when that prediction is among `predictions`).
    """
    updated_by = annotation.get("updated_by")
    if isinstance(updated_by, Mapping):
        updated_by = updated_by.get("id")
    if updated_by is not None and updated_by != auto_user:
        return True
    parent = annotation.get("parent_prediction")
    for prediction in predictions:
        if parent is not None and prediction.get("id") == parent:
            return _result_key(annotation.get("result")) != _result_key(prediction.get("result"))
    return False


def annotation_source(
    annotation: Mapping[str, Any],
    auto_user: int,
    predictions: Sequence[Mapping[str, Any]] = (),
) -> LabelSource:
    """AUTO for the backend's own accepted predictions that nobody changed, ENGINEER for a
    person's label (an auto label an engineer edited included: see `edited_by_person`, which
    compares with the parent among the task's `predictions`), KNOWN for a label imported
    without a prediction by the backend's account (the initial set)."""
    if annotation.get("completed_by") != auto_user:
        return LabelSource.ENGINEER
    if not annotation.get("parent_prediction"):
        return LabelSource.KNOWN
    if edited_by_person(annotation, auto_user, predictions):
        return LabelSource.ENGINEER
    return LabelSource.AUTO


def label_sources(
    task: Mapping[str, Any], auto_user: int
) -> list[tuple[Mapping[str, Any], LabelSource]]:
    """The task's annotations that were not cancelled, each with who labelled it."""
    predictions = task.get("predictions") or []
    return [(a, annotation_source(a, auto_user, predictions)) for a in kept_annotations(task)]


def labelled_by_person(task: Mapping[str, Any], auto_user: int) -> bool:
    """Whether a person gave the task a label (an engineer, an engineer's edit of an auto
    label, or a known label of the initial set): such wafers grade the routing."""
    return any(source is not LabelSource.AUTO for _, source in label_sources(task, auto_user))


def label_of(task: Mapping[str, Any], labels: LabelConfig, auto_user: int) -> str | None:
    """The failure type a task is labelled with: a person's latest label beats an auto label
    (an auto label an engineer edited is that engineer's label)."""
    ranked = sorted(
        label_sources(task, auto_user),
        key=lambda pair: (pair[1] is not LabelSource.AUTO, pair[0].get("id") or 0),
    )
    for annotation, _ in reversed(ranked):
        for item in annotation.get("result") or []:
            if item.get("from_name") != labels.from_name:
                continue
            choices = (item.get("value") or {}).get("choices") or []
            if choices:
                return str(choices[0])
    return None


def has_prediction_of(task: Mapping[str, Any], version: str) -> bool:
    """Whether the task holds a prediction of model `version`."""
    return any(p.get("model_version") == version for p in task.get("predictions") or [])


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
        number = set_number_of(task)
        if number is None:
            continue
        c = counts.setdefault(number, Counter())
        c["total"] += 1
        annotations = kept_annotations(task)
        if not annotations:
            c["waiting"] += 1
        else:
            sources = {source for _, source in label_sources(task, auto_user)}
            for source in (LabelSource.ENGINEER, LabelSource.KNOWN, LabelSource.AUTO):
                if source in sources:
                    c[source.value] += 1
                    break
        if model_version and has_prediction_of(task, model_version):
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


def trained_through(card: ModelCard | None) -> int | None:
    """The last set the model learnt from (`ModelCard.trained_through_set`)."""
    return None if card is None else card.trained_through_set


def route_measure(settings: Settings, card: ModelCard | None) -> Measure:
    """The measure `serving_rule` routes by: the settings' with a fixed threshold or without a
    model; else the one the model's held-out wafers were scored in (its calibration), else the
    one it was trained for."""
    measure = Measure(settings.route_measure)
    if settings.route_threshold is not None or card is None:
        return measure
    if card.validation is not None:
        return Measure(card.validation.measure)
    if "route_threshold" in card.metrics:
        return Measure(card.route_measure or measure.value)
    return measure


def serving_rule(
    settings: Settings, card: ModelCard | None, probs: npt.NDArray[np.float64] | None = None
) -> RoutingRule:
    """The routing rule in force for wafers with probabilities `probs`.

    A fixed WAFER_ROUTE_THRESHOLD wins. Else, with the model's held-out validation wafers in
    its card and the batch's probabilities, the threshold is calibrated now for THIS batch:
    with WAFER_PROMISE_CONFIDENCE (default 0.95) so that the batch's own labeling accuracy is
    at least WAFER_TARGET_ACCURACY with that probability (`backend.calibration.promise_cut`),
    or, with WAFER_PROMISE_CONFIDENCE=0, so that its expected accuracy is (a Wilson bound per
    threshold, `calibrate`). Else the threshold calibrated at training time; else (no
    validation yet) every wafer goes to engineers. The measure is `route_measure`'s; `probs`
    are (n, k), or (views, n, k) for a measure of several drawings.
    """
    measure = Measure(settings.route_measure)
    if settings.route_threshold is not None:
        return RoutingRule(measure, settings.route_threshold)
    if card is None:
        return RoutingRule(measure, -math.inf)
    validation = card.validation
    if probs is not None and validation is not None and np.asarray(probs).size:
        stored = Measure(validation.measure)
        scores = np.asarray(validation.scores, dtype=np.float64)
        correct = np.asarray(validation.correct, dtype=np.bool_)
        batch = uncertainty(probs, stored)
        if settings.promise_confidence:
            promise = promise_cut(
                scores, correct, batch, settings.target_accuracy, settings.promise_confidence
            )
            return RoutingRule(stored, promise.threshold)
        return calibrate(scores, correct, stored, settings.target_accuracy, new_scores=batch).rule
    if "route_threshold" in card.metrics:
        stored = Measure(card.route_measure or measure.value)
        return RoutingRule(stored, float(card.metrics["route_threshold"]))
    return RoutingRule(measure, -math.inf)
