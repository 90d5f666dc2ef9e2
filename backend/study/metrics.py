"""Classification and labeling metrics over integer failure-type indices.

Per-class values are NaN where they are undefined (0/0) rather than silently 0, so that a class
absent from a set does not drag a macro average down; see each function for which case is NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt


def _check_labels(values: npt.ArrayLike, name: str) -> npt.NDArray[np.int64]:
    arr = np.asarray(values)
    if arr.size == 0 and arr.ndim <= 1:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be integer class indices, got dtype {arr.dtype}")
    if arr.min() < 0:
        raise ValueError(f"{name} contains a negative class index ({arr.min()})")
    return arr.astype(np.int64)


def _check_pair(
    true: npt.ArrayLike, other: npt.ArrayLike, other_name: str
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    t = _check_labels(true, "true")
    o = _check_labels(other, other_name)
    if t.shape != o.shape:
        raise ValueError(f"true and {other_name} differ in length: {t.size} vs {o.size}")
    return t, o


def confusion_matrix(
    true: npt.ArrayLike, pred: npt.ArrayLike, n_classes: int
) -> npt.NDArray[np.int64]:
    """``(n_classes, n_classes)`` counts: row = true class, column = predicted class."""
    if isinstance(n_classes, bool) or not isinstance(n_classes, int | np.integer):
        raise ValueError(f"n_classes must be an integer, got {n_classes!r}")
    if n_classes < 1:
        raise ValueError(f"n_classes must be at least 1, got {n_classes}")
    t, p = _check_pair(true, pred, "pred")
    k = int(n_classes)
    for name, arr in (("true", t), ("pred", p)):
        if arr.size and arr.max() >= k:
            raise ValueError(f"{name} contains class index {arr.max()} >= n_classes={k}")
    counts = np.bincount(t * k + p, minlength=k * k)
    return counts.reshape(k, k).astype(np.int64)


def _check_cm(cm: npt.ArrayLike) -> npt.NDArray[np.float64]:
    arr = np.asarray(cm)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise ValueError(f"confusion matrix must be square 2-D, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"confusion matrix must hold integer counts, got dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise ValueError("confusion matrix contains negative counts")
    return arr.astype(np.float64)


def _ratio(num: npt.NDArray[np.float64], den: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    out = np.full(num.shape, np.nan, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def per_class_recall(cm: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Correct / true wafers per class; NaN for a class with no true wafers."""
    m = _check_cm(cm)
    return _ratio(np.diag(m).copy(), m.sum(axis=1))


def per_class_precision(cm: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Correct / predicted wafers per class; NaN for a class nothing was predicted as."""
    m = _check_cm(cm)
    return _ratio(np.diag(m).copy(), m.sum(axis=0))


def per_class_f1(cm: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """``2 TP / (2 TP + FP + FN)`` per class (the harmonic mean of precision and recall).

    NaN for a class with neither true nor predicted wafers; 0 when the class has some but no
    correct ones (including when precision is NaN because nothing was predicted as it).
    """
    m = _check_cm(cm)
    tp = np.diag(m).copy()
    return _ratio(2.0 * tp, m.sum(axis=0) + m.sum(axis=1))


def macro_f1(cm: npt.ArrayLike, classes: Sequence[int] | None = None) -> float:
    """Mean F1 over ``classes`` (default: all), skipping NaN classes; NaN if none is defined."""
    f1 = per_class_f1(cm)
    if classes is not None:
        idx = np.asarray(classes)
        if idx.size and (not np.issubdtype(idx.dtype, np.integer) or idx.ndim != 1):
            raise ValueError(f"classes must be a sequence of class indices, got {classes!r}")
        if idx.size and (idx.min() < 0 or idx.max() >= f1.size):
            raise ValueError(f"classes must lie in [0, {f1.size}), got {classes!r}")
        f1 = f1[idx.astype(np.intp)]
    defined = f1[~np.isnan(f1)]
    return float(defined.mean()) if defined.size else float("nan")


def labeling_accuracy(true: npt.ArrayLike, final_labels: npt.ArrayLike) -> float:
    """Share of wafers whose final label (auto or engineer) equals the true one; NaN if empty."""
    t, f = _check_pair(true, final_labels, "final_labels")
    return float(np.mean(t == f)) if t.size else float("nan")
