"""Routing methods compared on the same model outputs: which wafers go to an engineer.

Layer L0 (numpy only). Each method turns a set's model outputs (`Evidence`: logits of the set's
wafers and of the held-out wafers with known labels, in the wafer's 8 symmetric drawings) into an
auto label and a score per wafer, higher = more likely wrong. `route_at_target` then picks the cut
on the held-out wafers with the same Wilson-bound calibration as the backend
(`backend.calibration`), so every method makes the same promise; `accuracy_curve` gives the whole
trade-off of labeling accuracy against engineer labels for a plot.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from backend.calibration import calibrate_scores
from backend.study.error_curves import cross_fitted_errors
from backend.study.novelty import energy, novelty_cut
from backend.study.symmetric_views import summarize_views, view_uncertainty
from backend.study.temperature import fit_temperature, softmax
from backend.uncertainty import Measure, uncertainty


@dataclass(frozen=True)
class Evidence:
    """One set's model outputs: ``logits`` (views, wafers, classes) with ``true`` labels, and
    the same for the held-out wafers the routing is calibrated on. View 0 is the wafer as
    drawn; methods that need 8 views need all 8."""

    logits: npt.NDArray[np.float32]
    true: npt.NDArray[np.int64]
    val_logits: npt.NDArray[np.float32]
    val_true: npt.NDArray[np.int64]

    def __post_init__(self) -> None:
        for z, y, what in (
            (self.logits, self.true, "set"),
            (self.val_logits, self.val_true, "held-out"),
        ):
            if z.ndim != 3 or z.shape[1] != len(y):
                raise ValueError(f"{what} logits must be (views, {len(y)}, classes), got {z.shape}")
        if self.logits.shape[0] != self.val_logits.shape[0]:
            raise ValueError("set and held-out logits have different numbers of views")

    @property
    def views(self) -> int:
        return int(self.logits.shape[0])


@dataclass(frozen=True)
class Scored:
    """A method's auto label and score (higher = more likely wrong) for every wafer."""

    label: npt.NDArray[np.int64]
    score: npt.NDArray[np.float64]
    val_label: npt.NDArray[np.int64]
    val_score: npt.NDArray[np.float64]


def _softmax_measure(
    measure: Measure, temperature_scaled: bool
) -> Callable[[Evidence, np.random.Generator], Scored]:
    def score(e: Evidence, rng: np.random.Generator) -> Scored:
        t = fit_temperature(e.val_logits[0], e.val_true) if temperature_scaled else 1.0
        p, vp = softmax(e.logits[0], t), softmax(e.val_logits[0], t)
        return Scored(p.argmax(1), uncertainty(p, measure), vp.argmax(1), uncertainty(vp, measure))

    return score


def eight_views(e: Evidence, rng: np.random.Generator) -> Scored:
    """Mean probability over the 8 drawings, scored by `symmetric_views.view_uncertainty`."""
    if e.views < 8:
        raise ValueError(f"the 8-view method needs 8 views, the evidence has {e.views}")
    s = summarize_views(np.stack([softmax(z) for z in e.logits]))
    v = summarize_views(np.stack([softmax(z) for z in e.val_logits]))
    return Scored(
        s.mean_probs.argmax(1), view_uncertainty(s), v.mean_probs.argmax(1), view_uncertainty(v)
    )


def per_type(
    base: Callable[[Evidence, np.random.Generator], Scored],
) -> Callable[[Evidence, np.random.Generator], Scored]:
    """``base``'s score turned into an error probability per predicted failure type
    (`backend.study.error_curves`), cross-fitted on the held-out wafers."""

    def score(e: Evidence, rng: np.random.Generator) -> Scored:
        b = base(e, rng)
        val_err, curves = cross_fitted_errors(
            b.val_score, b.val_label, b.val_label == e.val_true, rng
        )
        return Scored(b.label, curves.error_probability(b.score, b.label), b.val_label, val_err)

    return score


def with_novelty(
    base: Callable[[Evidence, np.random.Generator], Scored],
) -> Callable[[Evidence, np.random.Generator], Scored]:
    """``base``, but a wafer whose energy (`backend.study.novelty`) is above the held-out wafers'
    99.5th percentile scores above every other wafer, so it goes to an engineer first."""

    def score(e: Evidence, rng: np.random.Generator) -> Scored:
        b = base(e, rng)
        cut = novelty_cut(energy(e.val_logits[0]))
        top = 1.0 + max(float(b.score.max(initial=0.0)), float(b.val_score.max(initial=0.0)))
        novel, val_novel = energy(e.logits[0]) > cut, energy(e.val_logits[0]) > cut
        return Scored(
            b.label,
            np.where(novel, top, b.score),
            b.val_label,
            np.where(val_novel, top, b.val_score),
        )

    return score


#: The methods compared, by the name the reports use.
METHODS: dict[str, Callable[[Evidence, np.random.Generator], Scored]] = {
    "least confidence": _softmax_measure(Measure.LEAST_CONFIDENCE, False),
    "margin": _softmax_measure(Measure.MARGIN, False),
    "entropy": _softmax_measure(Measure.ENTROPY, False),
    "margin, temperature-scaled": _softmax_measure(Measure.MARGIN, True),
    "entropy, temperature-scaled": _softmax_measure(Measure.ENTROPY, True),
    "per-type margin": per_type(_softmax_measure(Measure.MARGIN, False)),
    "8 views": eight_views,
    "per-type 8 views": per_type(eight_views),
    "per-type 8 views + novelty": with_novelty(per_type(eight_views)),
}
#: Methods that need all 8 views of every wafer (8 times the prediction cost).
NEEDS_VIEWS = frozenset({"8 views", "per-type 8 views", "per-type 8 views + novelty"})


@dataclass(frozen=True)
class Routed:
    """A method's routing of one set at a promised accuracy."""

    engineer: npt.NDArray[np.bool_]
    final: npt.NDArray[np.int64]
    threshold: float
    predicted_accuracy: float


def route_at_target(
    scored: Scored,
    true: npt.NDArray[np.int64],
    val_true: npt.NDArray[np.int64],
    target: float,
    confidence: float,
) -> Routed:
    """Engineer labels where the calibrated cut says so; final labels = true there, auto elsewhere."""
    cut = calibrate_scores(
        scored.val_score, scored.val_label == val_true, target, confidence, scored.score
    )
    engineer = cut.needs_engineer(scored.score)
    return Routed(
        engineer, np.where(engineer, true, scored.label), cut.threshold, cut.predicted_accuracy
    )


def accuracy_curve(
    score: npt.ArrayLike, label: npt.ArrayLike, true: npt.ArrayLike
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Engineer ratio and labeling accuracy when the m highest-scoring wafers go to engineers,
    for m = 0..n (the best any cut on this score can do on these wafers)."""
    s = np.asarray(score, dtype=np.float64)
    wrong = np.asarray(label) != np.asarray(true)
    n = len(s)
    order = np.argsort(-s, kind="stable")
    fixed = np.concatenate([[0], np.cumsum(wrong[order])])
    m = np.arange(n + 1)
    return m / max(n, 1), 1.0 - (wrong.sum() - fixed) / max(n, 1)


def engineer_share_for(
    score: npt.ArrayLike, label: npt.ArrayLike, true: npt.ArrayLike, accuracy: float
) -> float:
    """The least engineer ratio at which some cut on ``score`` reaches ``accuracy`` (curve lookup)."""
    ratio, acc = accuracy_curve(score, label, true)
    ok = np.flatnonzero(acc >= accuracy)
    return float(ratio[ok[0]]) if ok.size else 1.0
