"""Test-time augmentation: the model's view of a wafer in each of its 8 symmetries.

Layer L0 (numpy only). A wafer map's failure type does not change when it is rotated by 90
degrees or mirrored, so the model should say the same thing for all 8 drawings. Averaging the 8
probability rows gives a steadier prediction; how many of the 8 agree with that average's
failure type measures how much the model's answer depends on the drawing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from backend.uncertainty import margin, mean_over_views

#: rotations by 0, 90, 180, 270 degrees, then the same after a left-right mirror
N_VIEWS = 8


@dataclass(frozen=True)
class ViewSummary:
    """Mean probabilities over the views and the share of views that agree with their argmax."""

    mean_probs: npt.NDArray[np.float64]
    agreement: npt.NDArray[np.float64]


def summarize_views(view_probs: npt.ArrayLike) -> ViewSummary:
    """``view_probs`` (views, wafers, classes) -> mean probabilities and agreement in [1/v, 1]."""
    p = np.asarray(view_probs, dtype=np.float64)
    if p.ndim != 3 or p.shape[0] < 1:
        raise ValueError(f"view_probs must be (views, wafers, classes), got shape {p.shape}")
    mean, agreement = mean_over_views(p)
    return ViewSummary(mean, agreement)


def view_uncertainty(summary: ViewSummary) -> npt.NDArray[np.float64]:
    """``1 - margin(mean) * agreement``: higher = more uncertain, in [0, 1] (the served
    ``eight-views`` measure, `backend.uncertainty.uncertainty`).

    A wafer is sure only when the averaged top two are far apart AND every view agrees.
    """
    return np.asarray(1.0 - margin(summary.mean_probs) * summary.agreement, dtype=np.float64)
