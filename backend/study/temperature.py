"""Temperature scaling of a classifier's logits and the expected calibration error (ECE).

Layer L0 (numpy only). A network trained to low loss tends to be over-confident: its top
probability is higher than how often it is right. Dividing the logits by one temperature
``T > 1`` fitted on held-out wafers (minimum negative log-likelihood, Guo et al. 2017) makes the
probabilities honest without changing any wafer's predicted failure type. The ECE says how far
they are from honest: the wafer-weighted mean gap between confidence and accuracy over
equal-width confidence bins.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

#: The temperatures searched (the fit is on 1 / T, where the loss is convex).
TEMPERATURE_RANGE = (0.05, 20.0)


def _logits(logits: npt.ArrayLike) -> npt.NDArray[np.float64]:
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] < 2:
        raise ValueError(f"logits must be (wafers, classes >= 2), got shape {z.shape}")
    if not np.all(np.isfinite(z)):
        raise ValueError("logits contain NaN or infinite values")
    return z


def _labels(true: npt.ArrayLike, n: int, k: int) -> npt.NDArray[np.int64]:
    y = np.asarray(true)
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"true must be {n} integer class indices, got {y.dtype} {y.shape}")
    if n and (y.min() < 0 or y.max() >= k):
        raise ValueError(f"true holds a class index outside 0..{k - 1}")
    return y.astype(np.int64)


def softmax(logits: npt.ArrayLike, temperature: float = 1.0) -> npt.NDArray[np.float64]:
    """Row-wise softmax of ``logits / temperature`` in float64 (stable for any logit size)."""
    if not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    z = _logits(logits) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=1, keepdims=True), dtype=np.float64)


def negative_log_likelihood(
    logits: npt.ArrayLike, true: npt.ArrayLike, temperature: float = 1.0
) -> float:
    """Mean ``-ln p(true class)`` of ``softmax(logits / temperature)``."""
    z = _logits(logits) / temperature
    y = _labels(true, len(z), z.shape[1])
    if not len(z):
        return 0.0
    top = z.max(axis=1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(z - top).sum(axis=1))
    return float(np.mean(log_norm - z[np.arange(len(z)), y]))


def fit_temperature(logits: npt.ArrayLike, true: npt.ArrayLike, iterations: int = 60) -> float:
    """The temperature in `TEMPERATURE_RANGE` with the least held-out negative log-likelihood.

    Golden-section search on ``1 / T``, where the loss is convex. No wafers gives 1.0 (no change).
    """
    z = _logits(logits)
    y = _labels(true, len(z), z.shape[1])
    if not len(z):
        return 1.0
    lo, hi = 1.0 / TEMPERATURE_RANGE[1], 1.0 / TEMPERATURE_RANGE[0]
    ratio = (math.sqrt(5.0) - 1.0) / 2.0

    def loss(beta: float) -> float:
        return negative_log_likelihood(z, y, 1.0 / beta)

    a, b = lo + (1 - ratio) * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = loss(a), loss(b)
    for _ in range(iterations):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = lo + (1 - ratio) * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = loss(b)
    return 1.0 / ((lo + hi) / 2.0)


def expected_calibration_error(probs: npt.ArrayLike, true: npt.ArrayLike, bins: int = 15) -> float:
    """Wafer-weighted mean |accuracy - confidence| over ``bins`` equal-width bins of max p.

    0 for perfectly honest probabilities; no wafers gives 0.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probs must be (wafers, classes), got shape {p.shape}")
    y = _labels(true, len(p), p.shape[1])
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    if not len(p):
        return 0.0
    confidence = p.max(axis=1)
    correct = p.argmax(axis=1) == y
    which = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    n = np.bincount(which, minlength=bins)
    gap = np.abs(
        np.bincount(which, weights=correct, minlength=bins)
        - np.bincount(which, weights=confidence, minlength=bins)
    )
    return float(gap.sum() / n.sum())
