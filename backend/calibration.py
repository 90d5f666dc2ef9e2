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


# ---- a promise per set, with a stated confidence -----------------------------------------------
#
# `calibrate_scores` bounds the EXPECTED auto-label error at each threshold (a Wilson bound per
# threshold, the search over thresholds uncorrected). A set of N wafers then scatters around that:
# with 2,000 wafers and ~10 expected errors, by about +-3 errors, so a set can come out below the
# target although the bound held. `promise_cut` makes the promise about the set itself:
#
#     P(the set's labeling accuracy >= target) >= confidence
#
# The set may hold E = floor((1 - target) * N) wrong auto labels. At a threshold t, m held-out
# wafers score <= t and k of them are wrong; the set would auto-label n wafers, X of them wrong.
# Held-out wafers and set wafers are random wafers of one process, so given the total T = k + X
# the k errors of the held-out wafers are a random draw of m from the m + n wafers:
# K ~ Hypergeometric(m + n, T, m), whatever the error rate. The set fails when X >= E + 1, and
# then T >= k + E + 1; so t is accepted when even T = k + E + 1 would make so few held-out errors
# unlikely: P(Hypergeometric(m + n, k + E + 1, m) <= k) <= delta = 1 - confidence. This exact
# prediction bound (a conditional test, as for a future binomial count) bounds the set's failure
# at delta directly, without a bound on the error rate plus a second one on the scatter (the
# older "union" method, kept for comparison, splits delta between those two and is more cautious).
# Thresholds are tested in a fixed order, from the most cautious (fewest auto labels) up, and
# the search stops at the first one that is not accepted (fixed-sequence testing, as in
# Learn-then-Test: the order does not depend on the held-out labels). `promise-check` measures
# how often sets miss on real predictions. Production audits check the one-process assumption.

#: Candidate thresholds tested per set (quantiles of the set's own scores).
PROMISE_GRID = 256

#: How `promise_cut` bounds a set's failure: "exact" (the prediction bound, served) or "union"
#: (an error-rate bound plus the set's scatter, each at half the failure probability).
PROMISE_METHODS = ("exact", "union")


def allowed_errors(set_size: int, target_accuracy: float) -> int:
    """How many wrong labels a set of `set_size` wafers may hold at `target_accuracy`."""
    return math.floor((1.0 - target_accuracy) * set_size + 1e-9)


def _log_factorials(n: int) -> npt.NDArray[np.float64]:
    return np.concatenate(([0.0], np.cumsum(np.log(np.arange(1, n + 1, dtype=np.float64)))))


def _binomial_cdf(
    k: npt.NDArray[np.int64],
    n: npt.NDArray[np.int64],
    p: npt.NDArray[np.float64],
    log_fact: npt.NDArray[np.float64],
) -> npt.NDArray[np.float64]:
    """P(Binomial(n, p) <= k), element-wise (exact sums of the pmf in log space)."""
    i = np.arange(int(k.max(initial=0)) + 1)[:, None]
    inside = i <= np.minimum(k, n)[None, :]
    p_safe = np.clip(p, 1e-300, 1.0 - 1e-16)[None, :]
    m = np.where(inside, i, 0)
    log_pmf = (
        log_fact[n][None, :]
        - log_fact[m]
        - log_fact[np.maximum(n[None, :] - m, 0)]
        + m * np.log(p_safe)
        + (n[None, :] - m) * np.log1p(-p_safe)
    )
    cdf = np.where(inside, np.exp(log_pmf), 0.0).sum(axis=0)
    return np.asarray(np.where(k >= n, 1.0, np.minimum(cdf, 1.0)), dtype=np.float64)


def hypergeometric_cdf(
    k: npt.ArrayLike, population: npt.ArrayLike, successes: npt.ArrayLike, draws: npt.ArrayLike
) -> npt.NDArray[np.float64]:
    """P(H <= k) for H ~ Hypergeometric(population, successes, draws), element-wise (exact sums
    of the pmf in log space)."""
    k_arr, pop, succ, n = (
        np.asarray(a, dtype=np.int64).ravel() for a in (k, population, successes, draws)
    )
    if not k_arr.shape == pop.shape == succ.shape == n.shape:
        raise ValueError("k, population, successes and draws must be of one shape")
    if (succ < 0).any() or (n < 0).any() or (succ > pop).any() or (n > pop).any():
        raise ValueError("successes and draws must be between 0 and the population")
    log_fact = _log_factorials(int(pop.max(initial=0)))
    i = np.arange(int(np.clip(k_arr, 0, None).max(initial=0)) + 1)[:, None]
    low = np.maximum(0, n + succ - pop)[None, :]
    high = np.minimum(np.minimum(k_arr, succ), n)[None, :]
    inside = (i >= low) & (i <= high)
    j = np.where(inside, i, low)

    def log_choose(a: npt.NDArray[np.int64], b: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
        return np.asarray(log_fact[a] - log_fact[b] - log_fact[a - b], dtype=np.float64)

    log_pmf = (
        log_choose(succ[None, :], j)
        + log_choose((pop - succ)[None, :], n[None, :] - j)
        - log_choose(pop, n)[None, :]
    )
    cdf = np.where(inside, np.exp(log_pmf), 0.0).sum(axis=0)
    return np.asarray(np.clip(cdf, 0.0, 1.0), dtype=np.float64)


def largest_rate(
    k: npt.ArrayLike, n: npt.ArrayLike, probability: float, iterations: int = 60
) -> npt.NDArray[np.float64]:
    """The largest p with P(Binomial(n, p) <= k) >= `probability`, element-wise.

    With `probability` = alpha it is the exact one-sided (Clopper-Pearson) upper confidence
    bound, at confidence 1 - alpha, on an error rate seen as k errors in n; with `probability`
    = 1 - alpha it is the highest error rate at which n wafers keep at most k errors with
    probability 1 - alpha. k >= n gives 1.0 (any rate). Bisection, vectorised.
    """
    k_arr = np.asarray(k, dtype=np.int64).ravel()
    n_arr = np.asarray(n, dtype=np.int64).ravel()
    if k_arr.shape != n_arr.shape or (k_arr < 0).any() or (n_arr < 0).any():
        raise ValueError("k and n must be non-negative and of one shape")
    if not 0.0 < probability < 1.0:
        raise ValueError(f"probability must be in (0, 1), got {probability!r}")
    log_fact = _log_factorials(int(n_arr.max(initial=0)))
    low: npt.NDArray[np.float64] = np.zeros(k_arr.shape, dtype=np.float64)
    high: npt.NDArray[np.float64] = np.ones(k_arr.shape, dtype=np.float64)
    for _ in range(iterations):
        mid = (low + high) / 2.0
        ok = _binomial_cdf(k_arr, n_arr, mid, log_fact) >= probability
        low = np.asarray(np.where(ok, mid, low), dtype=np.float64)
        high = np.asarray(np.where(ok, high, mid), dtype=np.float64)
    return np.asarray(np.where(k_arr >= n_arr, 1.0, low), dtype=np.float64)


@dataclass(frozen=True)
class PromiseCut:
    """A cut that keeps a set's labeling accuracy at or above ``target_accuracy`` with
    probability at least ``confidence``: wafers with score > ``threshold`` go to engineers
    (``-inf``: all of them). ``error_rate_bound`` is the Clopper-Pearson upper bound on the
    auto-label error rate at the cut (for information; the exact method does not use it),
    ``allowed_errors`` how many wrong labels the set may hold."""

    threshold: float
    target_accuracy: float
    confidence: float
    set_wafers: int
    auto_wafers: int
    allowed_errors: int
    error_rate_bound: float
    validation_wafers_below: int
    validation_errors_below: int

    @property
    def engineer_ratio(self) -> float:
        return 1.0 - self.auto_wafers / self.set_wafers if self.set_wafers else 1.0

    def needs_engineer(self, scores: npt.ArrayLike) -> npt.NDArray[np.bool_]:
        return np.asarray(np.asarray(scores, dtype=np.float64) > self.threshold, dtype=np.bool_)


def promise_cut(
    val_scores: npt.ArrayLike,
    val_correct: npt.ArrayLike,
    set_scores: npt.ArrayLike,
    target_accuracy: float,
    confidence: float = 0.95,
    method: str = "exact",
    estimate_share: float = 0.5,
    grid: int = PROMISE_GRID,
) -> PromiseCut:
    """The cut on a score (higher = more likely wrong) that auto-labels the most wafers of the
    set with scores `set_scores` while its labeling accuracy stays at or above
    `target_accuracy` with probability at least `confidence` (see the comment above: the exact
    prediction bound, fixed-sequence testing). With `method` "union", `estimate_share` of the
    failure probability goes to a Clopper-Pearson bound on the error rate, the rest to the
    set's binomial scatter.
    """
    if method not in PROMISE_METHODS:
        raise ValueError(f"method must be one of {', '.join(PROMISE_METHODS)}, got {method!r}")
    if isinstance(target_accuracy, bool) or not 0.0 < float(target_accuracy) < 1.0:
        raise ValueError(f"target_accuracy must be in (0, 1), got {target_accuracy!r}")
    if isinstance(confidence, bool) or not 0.5 <= float(confidence) < 1.0:
        raise ValueError(f"confidence must be in [0.5, 1), got {confidence!r}")
    if not 0.0 < estimate_share < 1.0:
        raise ValueError(f"estimate_share must be in (0, 1), got {estimate_share!r}")
    scores = _scores(val_scores, "val_scores")
    correct = _correct(val_correct, scores.size)
    new = np.sort(_scores(set_scores, "set_scores"))
    n_set = int(new.size)
    allowed = allowed_errors(n_set, float(target_accuracy))
    nothing = PromiseCut(
        -math.inf, float(target_accuracy), float(confidence), n_set, 0, allowed, 0.0, 0, 0
    )
    if n_set == 0:
        return nothing
    delta = 1.0 - float(confidence)
    delta_estimate, delta_scatter = delta * estimate_share, delta * (1.0 - estimate_share)
    # Candidates in a fixed order, from the most cautious up: quantiles of the set's own scores
    # (independent of the held-out labels), distinct, each auto-labelling more wafers.
    picks = np.unique(np.linspace(0, n_set - 1, num=min(grid, n_set)).round().astype(np.int64))
    thresholds = np.unique(new[picks])
    n_auto = np.searchsorted(new, thresholds, side="right").astype(np.int64)
    order = np.argsort(scores, kind="stable")
    ordered = scores[order]
    cum_errors = np.concatenate(([0], np.cumsum(~correct[order], dtype=np.int64)))
    m_below = np.searchsorted(ordered, thresholds, side="right").astype(np.int64)
    e_below = cum_errors[m_below]
    bound = largest_rate(e_below, m_below, delta_estimate if method == "union" else delta)
    bound = np.where(m_below == 0, 1.0, bound)
    if method == "union":
        tolerable = largest_rate(np.full(n_auto.shape, allowed), n_auto, 1.0 - delta_scatter)
        kept = bound <= tolerable
    else:
        # the set cannot fail when it auto-labels no more wafers than it may get wrong
        failing = e_below + allowed + 1
        room = n_auto > allowed
        tail = hypergeometric_cdf(
            e_below,
            np.where(room, m_below + n_auto, failing),
            np.where(room, failing, 0),
            np.where(room, m_below, 0),
        )
        kept = ~room | (tail <= delta)
    failed = np.flatnonzero(~kept)
    last = (failed[0] if failed.size else kept.size) - 1
    if last < 0:
        return nothing
    return PromiseCut(
        threshold=float(thresholds[last]),
        target_accuracy=float(target_accuracy),
        confidence=float(confidence),
        set_wafers=n_set,
        auto_wafers=int(n_auto[last]),
        allowed_errors=allowed,
        error_rate_bound=float(bound[last]),
        validation_wafers_below=int(m_below[last]),
        validation_errors_below=int(e_below[last]),
    )
