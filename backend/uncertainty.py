"""Uncertainty of a classifier's softmax output, one score per wafer.

Every function takes ``probs``, an ``(n, k)`` array with one row of class probabilities per wafer
(``k >= 2`` failure types). Rows are checked (2-D, finite, non-negative, summing to 1 within
1e-3 so that float32 softmax outputs pass) and converted to float64 before any arithmetic; the
conversion from float32 is exact. Rows are NOT renormalised, so a row that sums to slightly more
than 1 can give a score a hair below 0. ``n = 0`` (shape ``(0, k)``) gives an empty result.
"""

from __future__ import annotations

import math
from enum import StrEnum

import numpy as np
import numpy.typing as npt

ROW_SUM_TOLERANCE = 1e-3


class Measure(StrEnum):
    """The three uncertainty measures of the study, and the backend's measures over several
    drawings of a wafer."""

    LEAST_CONFIDENCE = "least-confidence"
    MARGIN = "margin"
    ENTROPY = "entropy"
    #: The model's answer over the 8 symmetric drawings of a wafer (rotations by 0-270 degrees,
    #: mirrored or not): ``1 - margin(mean probability) * agreement``, where agreement is the
    #: share of drawings whose top failure type is the mean's. The study's best routing measure.
    EIGHT_VIEWS = "eight-views"
    #: Eight views only for the wafers the model is unsure of in one drawing (one-view
    #: ``p1 - p2`` below `SURE_ONE_VIEW_MARGIN`); a sure wafer's one drawing stands for all 8,
    #: which scores it by its one-view margin. About a fifth of the prediction work of
    #: EIGHT_VIEWS on WM-811K; held-out wafers are scored the same way, so the promise holds.
    EIGHT_VIEWS_WHEN_UNSURE = "eight-views-when-unsure"


#: Drawings of a wafer a measure scores (the others read one).
VIEWS = {Measure.EIGHT_VIEWS: 8, Measure.EIGHT_VIEWS_WHEN_UNSURE: 8}

#: One-view ``p1 - p2`` at or above which EIGHT_VIEWS_WHEN_UNSURE draws a wafer no more.
SURE_ONE_VIEW_MARGIN = 0.99


def views_for(measure: Measure | str) -> int:
    """How many of a wafer's symmetric drawings the model must see for `measure`."""
    return VIEWS.get(Measure(measure), 1)


def sure_margin_for(measure: Measure | str) -> float | None:
    """The one-view margin at or above which `measure` reads only a wafer's first drawing (None:
    every wafer is drawn `views_for(measure)` times)."""
    return SURE_ONE_VIEW_MARGIN if Measure(measure) is Measure.EIGHT_VIEWS_WHEN_UNSURE else None


def first_view_sure(probs: npt.ArrayLike, sure_margin: float) -> npt.NDArray[np.bool_]:
    """Wafers whose first drawing's ``p1 - p2`` is at least `sure_margin`; ``probs`` (n, k) of
    one drawing or (views, n, k) of several."""
    arr = np.asarray(probs)
    return np.asarray(margin(arr[0] if arr.ndim == 3 else arr) >= sure_margin, dtype=np.bool_)


def first_view_for_sure(probs: npt.ArrayLike, sure_margin: float) -> npt.NDArray[np.float64]:
    """``probs`` (views, n, k) with every drawing of a wafer sure in its first (`first_view_sure`)
    replaced by that first one: what EIGHT_VIEWS_WHEN_UNSURE scores. Idempotent, so drawings
    predicted only for the unsure wafers (the others filled with the first) score the same as
    all 8 drawings of every wafer."""
    arr = np.asarray(probs, dtype=np.float64)
    if arr.ndim != 3:
        return check_probs(arr)
    sure = first_view_sure(arr, sure_margin)
    out = arr.copy()
    out[:, sure] = arr[0, sure][None, :, :]
    return out


def check_probs(probs: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Return ``probs`` as a float64 ``(n, k)`` array, or raise ValueError saying what is wrong."""
    arr = np.asarray(probs)
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        raise ValueError(f"probs must be a real numeric array, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"probs must be 2-D (wafers x classes), got shape {arr.shape}")
    if arr.shape[1] < 2:
        raise ValueError(f"probs needs at least 2 classes per row, got {arr.shape[1]}")
    out = arr.astype(np.float64)
    if not np.all(np.isfinite(out)):
        raise ValueError("probs contains NaN or infinite values")
    if np.any(out < 0):
        raise ValueError("probs contains negative values")
    sums = out.sum(axis=1)
    bad = np.flatnonzero(np.abs(sums - 1.0) > ROW_SUM_TOLERANCE)
    if bad.size:
        raise ValueError(
            f"probs rows must sum to 1 (within {ROW_SUM_TOLERANCE}); row {bad[0]} sums to "
            f"{sums[bad[0]]!r} ({bad.size} bad rows)"
        )
    return out


def least_confidence(probs: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """``1 - max_k p``: 0 for a one-hot row, ``1 - 1/k`` for a uniform row."""
    p = check_probs(probs)
    if p.shape[0] == 0:
        return np.zeros(0, dtype=np.float64)
    return np.asarray(1.0 - p.max(axis=1), dtype=np.float64)


def margin(probs: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """``p1 - p2``, the largest minus the second largest probability (computed in float64).

    Always ``>= 0``; exactly 0 when the top two tie, 1 for a one-hot row. Higher means MORE
    certain, unlike the other two measures.
    """
    p = check_probs(probs)
    k = p.shape[1]
    if p.shape[0] == 0:
        return np.zeros(0, dtype=np.float64)
    top = np.partition(p, (k - 2, k - 1), axis=1)
    return np.asarray(top[:, k - 1] - top[:, k - 2], dtype=np.float64)


def entropy(probs: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """``-sum_k p ln p`` in nats, with ``0 ln 0 = 0``: 0 for one-hot, ``ln k`` for uniform."""
    p = check_probs(probs)
    logp = np.zeros_like(p)
    np.log(p, out=logp, where=p > 0)
    return np.asarray(-(p * logp).sum(axis=1), dtype=np.float64)


def mean_over_views(
    probs: npt.ArrayLike,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """``probs`` of one drawing per wafer ``(n, k)``, or of several ``(views, n, k)``, as the mean
    probability rows ``(n, k)`` and the share of drawings whose top failure type is the mean's
    (1 for one drawing)."""
    arr = np.asarray(probs)
    if arr.ndim != 3:
        mean = check_probs(arr)
        return mean, np.ones(mean.shape[0], dtype=np.float64)
    if arr.shape[0] < 1:
        raise ValueError(f"probs of several views must be (views, n, k), got shape {arr.shape}")
    drawn = np.stack([check_probs(view) for view in arr])
    mean = drawn.mean(axis=0)
    votes = drawn.argmax(axis=2) == mean.argmax(axis=1)[None, :]
    return mean, np.asarray(votes.mean(axis=0), dtype=np.float64)


def uncertainty(probs: npt.ArrayLike, measure: Measure) -> npt.NDArray[np.float64]:
    """One score per wafer where higher = more uncertain.

    Least confidence and entropy as they are; margin as ``1 - (p1 - p2)``; eight views as
    ``1 - (p1 - p2) * agreement``. ``probs`` of several drawings ``(views, n, k)`` are scored
    on their mean (`mean_over_views`); one drawing ``(n, k)`` has agreement 1.
    """
    measure = Measure(measure)
    sure_margin = sure_margin_for(measure)
    if sure_margin is not None:
        probs = first_view_for_sure(probs, sure_margin)
    mean, agreement = mean_over_views(probs)
    if measure is Measure.LEAST_CONFIDENCE:
        return least_confidence(mean)
    if measure is Measure.MARGIN:
        return np.asarray(1.0 - margin(mean), dtype=np.float64)
    if measure in (Measure.EIGHT_VIEWS, Measure.EIGHT_VIEWS_WHEN_UNSURE):
        return np.asarray(1.0 - margin(mean) * agreement, dtype=np.float64)
    return entropy(mean)


def max_uncertainty(measure: Measure, n_classes: int) -> float:
    """The `uncertainty` score of a uniform row over ``n_classes`` classes (the largest possible).

    Closed forms: ``1 - 1/k`` (least confidence), ``1`` (margin, eight views), ``ln k`` (entropy); `uncertainty`
    on an actual uniform row may differ from these by a rounding error.
    """
    measure = Measure(measure)
    if isinstance(n_classes, bool) or not isinstance(n_classes, int | np.integer):
        raise ValueError(f"n_classes must be an integer, got {n_classes!r}")
    if n_classes < 2:
        raise ValueError(f"n_classes must be at least 2, got {n_classes}")
    k = int(n_classes)
    if measure is Measure.LEAST_CONFIDENCE:
        return 1.0 - 1.0 / k
    if measure in (Measure.MARGIN, Measure.EIGHT_VIEWS, Measure.EIGHT_VIEWS_WHEN_UNSURE):
        return 1.0
    return math.log(k)
