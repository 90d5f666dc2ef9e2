"""Label Studio tasks -> wafer predictions -> Label Studio prediction entries.

Layer L2: combines the classifier (L1) with the labeling config, uncertainty measures and routing
rule (L0). Pictures arrive through an injected ``fetch`` (task image value -> (S, S) die codes,
normally `backend.images.model_input` with its client and settings bound), so this module does
no I/O of its own. `predict_tasks` reads a request's pictures inside one
`backend.images.request_pixel_budget`: past WAFER_REQUEST_MAX_PIXELS of decoding, the remaining
tasks get an error each and the others their predictions. An error message quotes task data, so
its control characters are escaped (`backend.images.escape_controls`) before anyone logs or
stores it.

What Label Studio 1.23.2 does with the ``results`` of one batched ``/predict`` call (read from
its ``ml/models.py``): the list must hold exactly one entry per task, in order, or the whole
batch is retried task by task (one entry) or dropped (any other length). An entry is a dict (one
prediction) or a list (any number, including none). Every prediction dict with a ``result`` key
is saved; one without is logged (``ML backend returns an incorrect prediction ... {entry}``) and
skipped while the rest of the batch is saved. All saved predictions are validated against the
labeling config in one go, so a single unknown choice would lose the whole batch.

A task whose picture cannot be read therefore becomes ``{"model_version": ..., "error": ...}``
with NO ``result``: Label Studio keeps the other tasks' predictions, writes the error message to
its log, and stores nothing for that task, so the next "Retrieve predictions" asks again (a
stored empty prediction of the current model version would mark the task as done for good).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from backend.classifier import WaferClassifier
from backend.images import escape_controls, request_pixel_budget
from backend.label_config import LabelConfig
from backend.routing import Route, RoutingRule, ScoredRoutes, scored_routes
from backend.uncertainty import (
    Measure,
    entropy,
    first_view_sure,
    least_confidence,
    margin,
    mean_over_views,
    sure_margin_for,
    views_for,
)

#: `WaferPrediction.route` of a task that could not be predicted.
ERROR_ROUTE = "error"


@dataclass(frozen=True)
class WaferPrediction:
    """The model's answer for one task, or why there is none.

    ``route`` is ``"auto"`` or ``"engineer"`` (from the routing rule) for a predicted task and
    ``"error"`` for one whose picture could not be read; then ``error`` holds the reason and the
    prediction fields are None / empty. ``score`` is how sure the model is by the routing
    rule's measure (`backend.routing.sureness`: max p, p1 - p2 or exp(-entropy); low = look at
    it first), made so that exactly the auto-routed wafers of a batch score at least the batch's
    cut (`backend.routing.scored_routes`). ``margin`` is ``p1 - p2`` (higher = more certain),
    the other two measures are higher = less certain.
    """

    task_id: int | None
    failure_type: str | None
    score: float | None
    probabilities: dict[str, float]
    least_confidence: float | None
    margin: float | None
    entropy: float | None
    route: str
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _task_id(task: Mapping[str, Any]) -> int | None:
    value = task.get("id")
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


def _image_value(task: Mapping[str, Any], field: str) -> str:
    data = task.get("data")
    if not isinstance(data, Mapping):
        raise ValueError("the task has no 'data' object")
    if field not in data:
        raise ValueError(f"the task's data has no {field!r} field (the labeling config's image)")
    value = data[field]
    if not isinstance(value, str):
        raise ValueError(f"the task's {field!r} must be a string URL, got {type(value).__name__}")
    return value


def _failed(task_id: int | None, message: str) -> WaferPrediction:
    """A failed prediction; ``message`` may quote task data: its control characters are
    escaped, so no line break or escape sequence reaches a log line or the task's data."""
    return WaferPrediction(
        task_id=task_id,
        failure_type=None,
        score=None,
        probabilities={},
        least_confidence=None,
        margin=None,
        entropy=None,
        route=ERROR_ROUTE,
        error=escape_controls(message),
    )


def check_failure_types(classifier: WaferClassifier, labels: LabelConfig) -> None:
    """Every failure type the model can predict must be a choice of the labeling config.

    Label Studio validates predictions against the config and drops the whole batch on one
    unknown choice, so a mismatch is refused here, before any picture is fetched.
    """
    unknown = [name for name in classifier.card.failure_types if name not in labels.failure_types]
    if unknown:
        raise ValueError(
            f"model version {classifier.card.version!r} predicts failure types that the labeling "
            f"config <Choices name={labels.from_name!r}> lacks: {', '.join(unknown)}"
        )


def read_pictures(
    tasks: Sequence[Mapping[str, Any]],
    classifier: WaferClassifier,
    labels: LabelConfig,
    fetch: Callable[[str], npt.NDArray[np.uint8]],
    stored: Mapping[int, npt.NDArray[np.uint8]] | None = None,
) -> list[npt.NDArray[np.uint8] | WaferPrediction]:
    """Each task's picture as the model's (S, S) die codes, or, for a task whose picture cannot
    be read (``fetch`` raising ValueError, e.g. `backend.images.ImageError`, or returning the
    wrong shape or values), its failed `WaferPrediction` (route ``"error"``); in task order.
    A task whose id is in `stored` (die codes from the wafer store) is not fetched at all."""
    size = classifier.card.image_size
    out: list[npt.NDArray[np.uint8] | WaferPrediction] = []
    for i, task in enumerate(tasks):
        task_id = _task_id(task)
        known = None if stored is None or task_id is None else stored.get(task_id)
        try:
            picture = np.asarray(
                known if known is not None else fetch(_image_value(task, labels.image_value))
            )
            if picture.shape != (size, size):
                raise ValueError(
                    f"the picture became die codes of shape {picture.shape}, not ({size}, {size})"
                )
            if picture.size and int(picture.max()) > 2:
                raise ValueError(f"die codes must be 0, 1 or 2, found {int(picture.max())}")
        except ValueError as exc:
            where = f"task {task_id}" if task_id is not None else f"task #{i}"
            out.append(_failed(task_id, f"{where}: {exc}"))
            continue
        out.append(picture.astype(np.uint8, copy=False))
    return out


def predict_tasks(
    tasks: Sequence[Mapping[str, Any]],
    classifier: WaferClassifier,
    labels: LabelConfig,
    rule: RoutingRule | Callable[[npt.NDArray[np.float64]], RoutingRule],
    fetch: Callable[[str], npt.NDArray[np.uint8]],
    stored: Mapping[int, npt.NDArray[np.uint8]] | None = None,
    measure: Measure | str = Measure.MARGIN,
) -> list[WaferPrediction]:
    """One `WaferPrediction` per task, in task order.

    Pictures are fetched one by one (`read_pictures`; tasks in `stored` take their die codes
    from there), all inside one `backend.images.request_pixel_budget`; a task whose picture
    cannot be read, or comes after the budget is spent, gets route ``"error"`` and the others
    go on. The readable ones are predicted in ONE batched `predict_codes` call; an error there
    (the model itself failing) propagates.
    """
    check_failure_types(classifier, labels)
    with request_pixel_budget():
        read = read_pictures(tasks, classifier, labels, fetch, stored)
    readable = [i for i, r in enumerate(read) if not isinstance(r, WaferPrediction)]
    out: list[WaferPrediction | None] = [
        r if isinstance(r, WaferPrediction) else None for r in read
    ]
    if readable:
        codes = np.stack([r for r in read if not isinstance(r, WaferPrediction)])
        predicted, _ = predict_codes(
            [_task_id(tasks[i]) for i in readable], codes, classifier, rule, measure=measure
        )
        for i, p in zip(readable, predicted, strict=True):
            out[i] = p
    return [p for p in out if p is not None]


def wafer_probabilities(
    classifier: WaferClassifier,
    codes: npt.NDArray[np.uint8],
    measure: Measure | str = Measure.MARGIN,
    progress: str | None = None,
) -> npt.NDArray[np.float64]:
    """The probabilities routing `measure` reads: (n, k) for one drawing of each wafer, (views,
    n, k) for several (`backend.uncertainty.views_for`). For a measure that draws only the
    wafers unsure in one drawing (`sure_margin_for`), the sure wafers' first drawing is
    repeated in place of the others (`first_view_for_sure` scores it so)."""
    views = views_for(measure)
    sure_margin = sure_margin_for(measure)
    if views == 1:
        return classifier.predict_proba(codes, progress=progress)
    if sure_margin is None:
        return classifier.predict_views(codes, views, progress=progress)
    first = classifier.predict_views(codes, 1, progress=progress)
    unsure = np.flatnonzero(~first_view_sure(first, sure_margin))
    drawn = np.repeat(first, views, axis=0)
    if len(unsure):
        more = f"{progress}: {views} views of {len(unsure)} unsure" if progress else None
        drawn[1:, unsure] = classifier.predict_views(codes[unsure], views, progress=more)[1:]
    return drawn


def predict_codes(
    task_ids: Sequence[int | None],
    codes: npt.NDArray[np.uint8],
    classifier: WaferClassifier,
    rule: RoutingRule | Callable[[npt.NDArray[np.float64]], RoutingRule],
    *,
    progress: str | None = None,
    measure: Measure | str = Measure.MARGIN,
) -> tuple[list[WaferPrediction], ScoredRoutes]:
    """Predict die codes (n, S, S) in batches, route them, and score them (`scored_routes`).

    `rule` may be a callable that picks the rule from all n wafers' probabilities (the
    calibration to the set). `progress` names a progress bar on stderr. The model sees each
    wafer in as many symmetric drawings as routing `measure` reads (`wafer_probabilities`):
    the rule and the scores get the probabilities of every drawing (views, n, k), the
    prediction the mean's failure type.
    """
    names = classifier.card.failure_types
    drawn = wafer_probabilities(classifier, codes, measure, progress)
    probs, _ = mean_over_views(drawn)
    lc, mg, en = least_confidence(probs), margin(probs), entropy(probs)
    chosen = rule if isinstance(rule, RoutingRule) else rule(drawn)
    routed = scored_routes(drawn, chosen)
    best = probs.argmax(axis=1)
    auto, engineer = Route.AUTO.value, Route.ENGINEER.value
    predicted = [
        WaferPrediction(
            task_id=task_id,
            failure_type=names[int(best[row])],
            score=float(routed.scores[row]),
            probabilities={name: float(p) for name, p in zip(names, probs[row], strict=True)},
            least_confidence=float(lc[row]),
            margin=float(mg[row]),
            entropy=float(en[row]),
            route=auto if routed.auto[row] else engineer,
        )
        for row, task_id in enumerate(task_ids)
    ]
    return predicted, routed


def to_label_studio(p: WaferPrediction, labels: LabelConfig, model_version: str) -> dict[str, Any]:
    """One entry of the ``/predict`` response ``results`` list for Label Studio 1.23.2.

    A predicted task: ``{"result": [{from_name, to_name, "type": "choices", "value":
    {"choices": [failure type]}}], "score": sureness, "model_version": ...}`` (low score =
    uncertain, so Label Studio's score filter and sort find the wafers to look at first).
    A task that could not be predicted: ``{"model_version": ..., "error": message}`` without a
    ``result`` (see the module docstring for why). ``model_version`` must equal what ``/setup``
    returned, or every "Retrieve predictions" adds duplicates.
    """
    if p.error is not None or p.failure_type is None or p.score is None:
        return {"model_version": model_version, "error": p.error or "no prediction"}
    if p.failure_type not in labels.failure_types:
        raise ValueError(
            f"failure type {p.failure_type!r} is not a choice of the labeling config "
            f"({', '.join(labels.failure_types)})"
        )
    return {
        "result": [
            {
                "from_name": labels.from_name,
                "to_name": labels.to_name,
                "type": "choices",
                "value": {"choices": [p.failure_type]},
            }
        ],
        "score": p.score,
        "model_version": model_version,
    }


def tasks_to_label_studio(
    predictions: Sequence[WaferPrediction], labels: LabelConfig, model_version: str
) -> list[dict[str, Any]]:
    """The whole ``results`` list: one `to_label_studio` entry per prediction, in order."""
    return [to_label_studio(p, labels, model_version) for p in predictions]
