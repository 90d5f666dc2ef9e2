"""Choose a routing threshold so that a new set's labeling accuracy meets a target.

Labeling accuracy of a set = 1 - (auto-labelled wafers whose auto label is wrong) / (all wafers);
engineer labels count as correct. For a threshold ``t`` (auto when score <= t) it is
``1 - auto_fraction * error_rate_among_auto``. The error rate among auto-labelled wafers is
estimated on held-out validation wafers with known labels and replaced by its one-sided Wilson
upper bound, so the promised accuracy holds with roughly the chosen confidence (per threshold;
the search over thresholds is not corrected for).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import numpy.typing as npt

from backend.routing import RoutingRule
from backend.uncertainty import Measure


def _z(confidence: float) -> float:
    if isinstance(confidence, bool) or not isinstance(confidence, int | float | np.floating):
        raise ValueError(f"confidence must be a number, got {confidence!r}")
    if not 0.5 <= confidence < 1.0:
        raise ValueError(f"confidence must be in [0.5, 1), got {confidence!r}")
    return NormalDist().inv_cdf(float(confidence))


def _wilson_upper(
    errors: npt.NDArray[np.int64], n: npt.NDArray[np.int64], z: float
) -> npt.NDArray[np.float64]:
    """Vectorised Wilson upper bound; n = 0 gives 1.0."""
    n_f = n.astype(np.float64)
    safe_n = np.maximum(n_f, 1.0)
    p = errors / safe_n
    z2 = z * z
    centre = p + z2 / (2.0 * safe_n)
    radius = z * np.sqrt(p * (1.0 - p) / safe_n + z2 / (4.0 * safe_n * safe_n))
    upper = np.minimum((centre + radius) / (1.0 + z2 / safe_n), 1.0)
    return np.asarray(np.where(n_f > 0, upper, 1.0), dtype=np.float64)


def wilson_upper(errors: int, n: int, confidence: float) -> float:
    """One-sided Wilson score upper bound on a binomial proportion ``errors / n``.

    ``z`` is the standard normal quantile at ``confidence``, so confidence 0.5 gives the plain
    ``errors / n``. ``n = 0`` (no evidence) gives 1.0.
    """
    for name, value in (("errors", errors), ("n", n)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if not 0 <= errors <= n:
        raise ValueError(f"need 0 <= errors <= n, got errors={errors}, n={n}")
    z = _z(confidence)
    bound = _wilson_upper(np.array([errors], np.int64), np.array([n], np.int64), z)
    return float(bound[0])


@dataclass(frozen=True)
class Calibration:
    """The chosen rule and what it promises.

    ``rule`` sends a wafer to an engineer when its score > ``rule.threshold``; a threshold of
    ``-inf`` means every wafer goes to an engineer. ``predicted_accuracy`` is the Wilson-bound
    labeling accuracy the rule promises on the set the auto fraction was measured on (the new set
    if given, else the validation set). ``feasible`` is False only when there was nothing to
    calibrate on (no validation wafers, or an empty new set); the rule is then all-engineer.
    """

    rule: RoutingRule
    target_accuracy: float
    confidence: float
    predicted_accuracy: float
    expected_engineer_ratio: float
    validation_wafers: int
    validation_auto_errors: int
    feasible: bool


def _scores(values: npt.ArrayLike, name: str) -> npt.NDArray[np.float64]:
    arr = np.asarray(values)
    if arr.size == 0:
        return np.zeros(0, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        raise ValueError(f"{name} must be real numbers, got dtype {arr.dtype}")
    out = arr.astype(np.float64)
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return out


def _correct(values: npt.ArrayLike, n: int) -> npt.NDArray[np.bool_]:
    arr = np.asarray(values)
    if arr.size == 0:
        arr = np.zeros(0, dtype=np.bool_)
    if arr.ndim != 1 or arr.size != n:
        raise ValueError(f"val_correct must be 1-D with {n} entries, got shape {arr.shape}")
    if arr.dtype != np.bool_ and (
        not np.issubdtype(arr.dtype, np.integer) or not np.all((arr == 0) | (arr == 1))
    ):
        raise ValueError("val_correct must be booleans (or 0/1 integers)")
    return arr.astype(np.bool_)


@dataclass(frozen=True)
class ScoreCut:
    """A cut on any score (higher = more likely wrong) chosen for a labeling-accuracy target:
    wafers with score > ``threshold`` go to an engineer (``-inf``: all of them). ``feasible``
    is False only when there was nothing to calibrate on (no validation wafers, or an empty new
    set); the cut then sends every wafer to an engineer."""

    threshold: float
    predicted_accuracy: float
    expected_engineer_ratio: float
    validation_auto_errors: int
    feasible: bool = True

    def needs_engineer(self, scores: npt.ArrayLike) -> npt.NDArray[np.bool_]:
        return np.asarray(np.asarray(scores, dtype=np.float64) > self.threshold, dtype=np.bool_)


def calibrate_scores(
    val_scores: npt.ArrayLike,
    val_correct: npt.ArrayLike,
    target_accuracy: float,
    confidence: float = 0.9,
    new_scores: npt.ArrayLike | None = None,
) -> ScoreCut:
    """Pick the cut on a score (higher = more likely wrong) that auto-labels the most wafers
    while meeting ``target_accuracy``: the search behind `calibrate`, for any score (an
    uncertainty measure, an estimated error probability, an 8-view score).

    ``val_correct`` says whether the model's label was right for each validation wafer.
    Candidates are the distinct validation scores plus "nothing auto" (always meets the target).
    The auto fraction comes from ``new_scores`` (the set about to be routed) if given, else from
    ``val_scores``. Ties in auto fraction go to the higher predicted accuracy, then to the lower
    threshold. O(n log n).
    """
    if isinstance(target_accuracy, bool) or not isinstance(
        target_accuracy, int | float | np.floating
    ):
        raise ValueError(f"target_accuracy must be a number, got {target_accuracy!r}")
    if not 0.0 < target_accuracy < 1.0:
        raise ValueError(f"target_accuracy must be in (0, 1), got {target_accuracy!r}")
    z = _z(confidence)
    scores = _scores(val_scores, "val_scores")
    correct = _correct(val_correct, scores.size)
    new = None if new_scores is None else _scores(new_scores, "new_scores")
    if scores.size == 0 or (new is not None and new.size == 0):
        return ScoreCut(-math.inf, 1.0, 1.0, 0, feasible=False)

    order = np.argsort(scores, kind="stable")
    ordered = scores[order]
    cum_errors = np.cumsum(~correct[order], dtype=np.int64)
    last = np.flatnonzero(np.append(ordered[1:] != ordered[:-1], True))
    thresholds = ordered[last]
    errors = cum_errors[last]
    upper = _wilson_upper(errors, (last + 1).astype(np.int64), z)
    if new is None:
        n_auto, n_total = last + 1, scores.size
    else:
        n_auto, n_total = np.searchsorted(np.sort(new), thresholds, side="right"), new.size
    auto_fraction = n_auto / n_total
    predicted = 1.0 - auto_fraction * upper
    ok = predicted >= target_accuracy
    if not ok.any() or n_auto[ok].max() == 0:
        return ScoreCut(-math.inf, 1.0, 1.0, 0)
    best = np.flatnonzero(ok & (n_auto == n_auto[ok].max()))
    i = int(best[np.argmax(predicted[best])])
    return ScoreCut(
        float(thresholds[i]), float(predicted[i]), float(1.0 - auto_fraction[i]), int(errors[i])
    )


def calibrate(
    val_scores: npt.ArrayLike,
    val_correct: npt.ArrayLike,
    measure: Measure,
    target_accuracy: float,
    confidence: float = 0.9,
    new_scores: npt.ArrayLike | None = None,
) -> Calibration:
    """Pick the threshold that auto-labels the most wafers while meeting ``target_accuracy``.

    ``val_scores`` are `backend.uncertainty.uncertainty` scores of validation wafers under
    ``measure``; the search is `calibrate_scores`'. Returns the rule on that measure and what it
    promises.
    """
    measure = Measure(measure)
    cut = calibrate_scores(val_scores, val_correct, target_accuracy, confidence, new_scores)
    return Calibration(
        rule=RoutingRule(measure, cut.threshold),
        target_accuracy=float(target_accuracy),
        confidence=float(confidence),
        predicted_accuracy=cut.predicted_accuracy,
        expected_engineer_ratio=cut.expected_engineer_ratio,
        validation_wafers=int(np.asarray(val_scores).size),
        validation_auto_errors=cut.validation_auto_errors,
        feasible=cut.feasible,
    )
