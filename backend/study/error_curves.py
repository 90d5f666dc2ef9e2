"""Per-failure-type error rates: how often an auto label of type c at score s is wrong.

Layer L0 (numpy only). One global threshold treats every predicted failure type alike, so the
rare patterns (whose auto labels are wrong more often at the same score) and "none" share one
cut. Instead, each predicted type with enough held-out wafers gets its own monotone curve from
uncertainty score to error probability (isotonic regression, pool-adjacent-violators); types
with fewer wafers share the curve of all types pooled. A wafer's routing score is then its
estimated error probability, and one calibrated cut on it acts like a threshold per failure type,
spending the accuracy budget where auto labels are cheapest.

Fitting the curves and choosing the cut on the same held-out wafers would flatter the promise, so
`cross_fitted_errors` scores each held-out wafer with curves fitted without it (k folds).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

#: Held-out wafers a predicted failure type needs for a curve of its own.
MIN_WAFERS_PER_TYPE = 100
#: Weight of the raw score inside one isotonic step, so a step's wafers keep their order.
TIE_BREAK = 1e-6


def isotonic_increasing(
    x: npt.ArrayLike, y: npt.ArrayLike
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """The least-squares non-decreasing fit of ``y`` on ``x`` (pool adjacent violators).

    Returns ``(knots, values)``: sorted distinct ``x`` and the fitted value at each. O(n log n).
    """
    xs = np.asarray(x, dtype=np.float64)
    ys = np.asarray(y, dtype=np.float64)
    if xs.shape != ys.shape or xs.ndim != 1:
        raise ValueError(f"x and y must be 1-D of one length, got {xs.shape} and {ys.shape}")
    if not xs.size:
        return np.zeros(0), np.zeros(0)
    order = np.argsort(xs, kind="stable")
    knots, start = np.unique(xs[order], return_index=True)
    sums = np.add.reduceat(ys[order], start)
    counts = np.diff(np.append(start, xs.size)).astype(np.float64)
    # blocks: (sum, count, number of knots); merge while the last two are out of order
    b_sum: list[float] = []
    b_cnt: list[float] = []
    b_len: list[int] = []
    for s, c in zip(sums.tolist(), counts.tolist(), strict=True):
        b_sum.append(s)
        b_cnt.append(c)
        b_len.append(1)
        while len(b_sum) > 1 and b_sum[-2] / b_cnt[-2] > b_sum[-1] / b_cnt[-1]:
            s2, c2, n2 = b_sum.pop(), b_cnt.pop(), b_len.pop()
            b_sum[-1] += s2
            b_cnt[-1] += c2
            b_len[-1] += n2
    values = np.repeat(np.array(b_sum) / np.array(b_cnt), b_len)
    return knots, values


def _step(
    knots: npt.NDArray[np.float64], values: npt.NDArray[np.float64], x: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """The fit at ``x``: the value of the last knot <= x (the first value below every knot)."""
    i = np.searchsorted(knots, x, side="right") - 1
    return np.asarray(values[np.clip(i, 0, len(values) - 1)], dtype=np.float64)


@dataclass(frozen=True)
class ClassErrors:
    """Error-probability curves: one per predicted failure type with its own, plus the pooled one."""

    curves: dict[int, tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]]
    pooled: tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]

    def error_probability(
        self, scores: npt.ArrayLike, predicted: npt.ArrayLike
    ) -> npt.NDArray[np.float64]:
        """Estimated chance that each wafer's auto label is wrong, plus a tiny share of its raw
        score so that wafers in one isotonic step keep their order (higher = send first)."""
        s = np.asarray(scores, dtype=np.float64)
        c = np.asarray(predicted)
        if s.shape != c.shape or s.ndim != 1:
            raise ValueError("scores and predicted must be 1-D of one length")
        out = np.empty_like(s)
        if not s.size:
            return out
        if not self.pooled[0].size:
            out[:] = 1.0
        else:
            out[:] = _step(*self.pooled, s)
        for cls, curve in self.curves.items():
            mine = c == cls
            if mine.any():
                out[mine] = _step(*curve, s[mine])
        return out + TIE_BREAK * s


def fit_class_errors(
    scores: npt.ArrayLike,
    predicted: npt.ArrayLike,
    correct: npt.ArrayLike,
    min_wafers: int = MIN_WAFERS_PER_TYPE,
) -> ClassErrors:
    """Curves from held-out wafers: their uncertainty scores, predicted types and correctness."""
    s = np.asarray(scores, dtype=np.float64)
    c = np.asarray(predicted)
    wrong = ~np.asarray(correct, dtype=np.bool_)
    if not (s.shape == c.shape == wrong.shape) or s.ndim != 1:
        raise ValueError("scores, predicted and correct must be 1-D of one length")
    curves = {}
    for cls in np.unique(c):
        mine = c == cls
        if mine.sum() >= min_wafers:
            curves[int(cls)] = isotonic_increasing(s[mine], wrong[mine])
    return ClassErrors(curves, isotonic_increasing(s, wrong))


def cross_fitted_errors(
    scores: npt.ArrayLike,
    predicted: npt.ArrayLike,
    correct: npt.ArrayLike,
    rng: np.random.Generator,
    folds: int = 5,
    min_wafers: int = MIN_WAFERS_PER_TYPE,
) -> tuple[npt.NDArray[np.float64], ClassErrors]:
    """Each held-out wafer's error probability from curves fitted on the other folds, and the
    curves fitted on all of them (for new wafers). Curves per type need ``min_wafers`` in the
    fitting folds, so a type's own curve appears a little later than with all wafers."""
    s = np.asarray(scores, dtype=np.float64)
    c = np.asarray(predicted)
    ok = np.asarray(correct, dtype=np.bool_)
    if folds < 2:
        raise ValueError(f"folds must be at least 2, got {folds}")
    fold = rng.permutation(len(s)) % folds
    out = np.empty(len(s), dtype=np.float64)
    for f in range(folds):
        test = fold == f
        if test.any():
            model = fit_class_errors(
                s[~test], c[~test], ok[~test], max(1, min_wafers * (folds - 1) // folds)
            )
            out[test] = model.error_probability(s[test], c[test])
    return out, fit_class_errors(s, c, ok, min_wafers)
