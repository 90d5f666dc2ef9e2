"""Route each wafer to an automatic label or to an engineer, from its uncertainty score.

A `RoutingRule` compares the `backend.uncertainty.uncertainty` score (higher = more uncertain)
with a threshold. The study states its rules on the natural quantities instead (``max p < 0.99``,
``p1 - p2 <= 0.98``); those become score rules with thresholds written as ``1 - 0.99`` and
``1 - 0.98``. That is exact, not just close, for float64 scores: ``1 - x`` has no rounding error
for ``x`` in [0.5, 1] (Sterbenz), so ``1 - max_p > 1 - 0.99`` holds exactly when
``max_p < 0.99`` does, and every row with ``max_p < 0.5`` is on the same side of both. Writing
the literal ``0.01`` instead would move the boundary by one rounding step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType

import numpy as np
import numpy.typing as npt

from backend.uncertainty import SURE_ONE_VIEW_MARGIN, Measure, uncertainty


class Route(StrEnum):
    """Where a wafer's label comes from."""

    AUTO = "auto"
    ENGINEER = "engineer"


@dataclass(frozen=True)
class RoutingRule:
    """Send a wafer to an engineer when its uncertainty score exceeds ``threshold``.

    ``inclusive=False``: engineer when ``score > threshold``; ``inclusive=True``: when
    ``score >= threshold``. The threshold may be infinite: ``-inf`` sends every wafer to an
    engineer, ``+inf`` (not inclusive) none. NaN is rejected.
    """

    measure: Measure
    threshold: float
    inclusive: bool = False

    def __post_init__(self) -> None:
        try:
            measure = Measure(self.measure)
        except ValueError as exc:
            raise ValueError(f"unknown uncertainty measure {self.measure!r}") from exc
        if isinstance(self.threshold, bool) or not isinstance(
            self.threshold, int | float | np.integer | np.floating
        ):
            raise ValueError(f"threshold must be a number, got {self.threshold!r}")
        threshold = float(self.threshold)
        if math.isnan(threshold):
            raise ValueError("threshold must not be NaN")
        if not isinstance(self.inclusive, bool | np.bool_):
            raise ValueError(f"inclusive must be a bool, got {self.inclusive!r}")
        object.__setattr__(self, "measure", measure)
        object.__setattr__(self, "threshold", threshold)
        object.__setattr__(self, "inclusive", bool(self.inclusive))

    def needs_engineer(self, probs: npt.ArrayLike) -> npt.NDArray[np.bool_]:
        """True for each wafer (row of ``probs``) that an engineer must label."""
        scores = uncertainty(probs, self.measure)
        if self.inclusive:
            return np.asarray(scores >= self.threshold, dtype=np.bool_)
        return np.asarray(scores > self.threshold, dtype=np.bool_)

    def routes(self, probs: npt.ArrayLike) -> npt.NDArray[np.str_]:
        """The `Route` value (``"auto"`` or ``"engineer"``) for each wafer."""
        return np.where(self.needs_engineer(probs), Route.ENGINEER.value, Route.AUTO.value)

    def describe(self) -> str:
        """When an engineer labels a wafer, in the study's terms, e.g. ``"max p < 0.99"``.

        Least confidence and margin are stated on ``max p`` and ``p1 - p2`` (``1 - threshold``),
        entropy on the entropy itself. Infinite thresholds read ``"every wafer"``/``"no wafer"``.
        """
        t = self.threshold
        if t == -math.inf:
            return "every wafer"
        if t == math.inf:
            return "no wafer"
        if self.measure is Measure.ENTROPY:
            op = ">=" if self.inclusive else ">"
            return f"entropy {op} {t!r}"
        if self.measure is Measure.EIGHT_VIEWS:
            op = "<=" if self.inclusive else "<"
            return f"(p1 - p2) x agreement over 8 views {op} {1.0 - t!r}"
        if self.measure is Measure.EIGHT_VIEWS_WHEN_UNSURE:
            op = "<=" if self.inclusive else "<"
            return (
                f"(p1 - p2) x agreement over 8 views (1 view when its p1 - p2 >= "
                f"{SURE_ONE_VIEW_MARGIN}) {op} {1.0 - t!r}"
            )
        op = "<=" if self.inclusive else "<"
        quantity = "max p" if self.measure is Measure.LEAST_CONFIDENCE else "p1 - p2"
        return f"{quantity} {op} {1.0 - t!r}"


STUDY_RULES: Mapping[Measure, RoutingRule] = MappingProxyType(
    {
        # engineer when max p < 0.99
        Measure.LEAST_CONFIDENCE: RoutingRule(Measure.LEAST_CONFIDENCE, 1.0 - 0.99),
        # engineer when p1 - p2 <= 0.98
        Measure.MARGIN: RoutingRule(Measure.MARGIN, 1.0 - 0.98, inclusive=True),
        # engineer when -sum p ln p > 0.05
        Measure.ENTROPY: RoutingRule(Measure.ENTROPY, 0.05),
    }
)
"""The study's hand-set thresholds, reproducing its exact comparisons."""


def engineer_order(probs: npt.ArrayLike, measure: Measure) -> npt.NDArray[np.intp]:
    """Wafer indices, most uncertain first; equal scores keep their original (index) order."""
    scores = uncertainty(probs, measure)
    return np.asarray(np.argsort(-scores, kind="stable"), dtype=np.intp)


def sureness(probs: npt.ArrayLike, measure: Measure) -> npt.NDArray[np.float64]:
    """How sure the model is of each wafer, by the routing measure, in [0, 1] (higher = surer):
    ``max p`` (least confidence), ``p1 - p2`` (margin), ``exp(-entropy)`` (entropy),
    ``(p1 - p2) x agreement`` (eight views, also when drawn only for unsure wafers).

    A decreasing function of the measure's uncertainty score, so sorting by it ascending lists
    the wafers most uncertain first. It is the score a prediction carries into Label Studio.
    """
    scores = uncertainty(probs, measure)
    if measure is Measure.ENTROPY:
        return np.asarray(np.exp(-scores), dtype=np.float64)
    return np.asarray(1.0 - scores, dtype=np.float64)


@dataclass(frozen=True)
class ScoredRoutes:
    """Each wafer's score and route, made so that ``route is auto`` exactly when
    ``score >= cut``: a query on the score alone (Label Studio's ``predictions_score``) then
    selects exactly the wafers the rule sends to an automatic label. ``cut`` is None when the
    rule sends every wafer to an engineer."""

    scores: npt.NDArray[np.float64]
    auto: npt.NDArray[np.bool_]
    cut: float | None


def scored_routes(probs: npt.ArrayLike, rule: RoutingRule) -> ScoredRoutes:
    """`sureness` by the rule's measure, with the rule's routes and the cut between them.

    The sureness of an engineer wafer can round to the same float as that of the least sure
    auto wafer (only at the rule's boundary); such a score is moved one float step down, so the
    cut separates the routes exactly.
    """
    scores = sureness(probs, rule.measure)
    auto = ~rule.needs_engineer(probs)
    if not auto.any():
        return ScoredRoutes(scores, auto, None)
    cut = float(scores[auto].min())
    ties = ~auto & (scores >= cut)
    if ties.any():
        scores = scores.copy()
        scores[ties] = np.nextafter(cut, -np.inf)
    return ScoredRoutes(scores, auto, cut)
