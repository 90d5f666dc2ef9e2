"""`sureness` and `scored_routes`: the prediction score that selects exactly the auto wafers."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest

from backend.routing import RoutingRule, scored_routes, sureness
from backend.uncertainty import Measure, entropy


def _probs(n: int, k: int = 9, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, k)) * rng.uniform(0.1, 8.0, size=(n, 1))
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_sureness_is_the_natural_quantity_of_each_measure() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3]])
    assert sureness(probs, Measure.LEAST_CONFIDENCE) == pytest.approx([0.7, 1 / 3])
    assert sureness(probs, Measure.MARGIN) == pytest.approx([0.5, 0.0])
    assert sureness(probs, Measure.ENTROPY) == pytest.approx(np.exp(-entropy(probs)))
    assert sureness(np.eye(3), Measure.ENTROPY) == pytest.approx([1.0, 1.0, 1.0])


@pytest.mark.parametrize("measure", list(Measure))
def test_score_orders_most_uncertain_first(measure: Measure) -> None:
    probs = _probs(500)
    scores = sureness(probs, measure)
    order = np.argsort(scores, kind="stable")
    from backend.uncertainty import uncertainty

    u = uncertainty(probs, measure)
    assert (np.diff(u[order]) <= 1e-12).all()


@pytest.mark.parametrize("measure", list(Measure))
@pytest.mark.parametrize("inclusive", [False, True])
def test_cut_selects_exactly_the_auto_wafers(measure: Measure, inclusive: bool) -> None:
    probs = _probs(2000, seed=3)
    from backend.uncertainty import uncertainty

    u = uncertainty(probs, measure)
    # A threshold equal to some wafers' own score: the boundary case.
    rule = RoutingRule(measure, float(np.quantile(u, 0.7)), inclusive=inclusive)
    routed = scored_routes(probs, rule)
    assert (routed.auto == ~rule.needs_engineer(probs)).all()
    assert routed.cut is not None
    assert ((routed.scores >= routed.cut) == routed.auto).all()


def test_ties_at_the_boundary_are_split() -> None:
    # Two wafers with the same probabilities: an inclusive rule at their score sends both to
    # engineers, an exclusive one both to auto; a third, surer wafer is auto either way.
    probs = np.array([[0.6, 0.4], [0.6, 0.4], [0.99, 0.01]])
    rule = RoutingRule(Measure.LEAST_CONFIDENCE, 1.0 - 0.6, inclusive=True)
    routed = scored_routes(probs, rule)
    assert routed.auto.tolist() == [False, False, True]
    assert routed.cut is not None
    assert ((routed.scores >= routed.cut) == routed.auto).all()


def test_a_tie_between_routes_moves_the_engineer_wafer_below_the_cut() -> None:
    probs = np.array([[0.75, 0.25], [0.75, 0.25]])

    class Split(RoutingRule):
        def needs_engineer(self, probs: npt.ArrayLike) -> npt.NDArray[np.bool_]:
            return np.array([True, False])

    routed = scored_routes(probs, Split(Measure.LEAST_CONFIDENCE, 0.25))
    assert routed.cut == 0.75
    assert routed.scores[1] == 0.75
    assert routed.scores[0] == math.nextafter(0.75, -math.inf)


def test_no_auto_wafer_means_no_cut() -> None:
    routed = scored_routes(_probs(50), RoutingRule(Measure.MARGIN, -math.inf))
    assert routed.cut is None
    assert not routed.auto.any()
