"""Routing rules, the study presets at their exact boundaries, and the engineer queue order."""

import dataclasses
import math

import numpy as np
import pytest

from backend.routing import STUDY_RULES, Route, RoutingRule, engineer_order
from backend.uncertainty import Measure, entropy, margin

LC = STUDY_RULES[Measure.LEAST_CONFIDENCE]
MARGIN = STUDY_RULES[Measure.MARGIN]
ENTROPY = STUDY_RULES[Measure.ENTROPY]


def test_presets_describe_the_study_rules():
    assert LC.describe() == "max p < 0.99"
    assert MARGIN.describe() == "p1 - p2 <= 0.98"
    assert ENTROPY.describe() == "entropy > 0.05"
    # the seed method's three measures (eight views are the offline study's and the backend's)
    eight = {Measure.EIGHT_VIEWS, Measure.EIGHT_VIEWS_WHEN_UNSURE}
    assert set(STUDY_RULES) == set(Measure) - eight


def test_presets_cannot_be_replaced():
    with pytest.raises(TypeError):
        STUDY_RULES[Measure.MARGIN] = LC  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        LC.threshold = 0.5  # type: ignore[misc]


def test_least_confidence_boundary():
    below = np.nextafter(0.99, 0.0)
    above = np.nextafter(0.99, 1.0)
    probs = np.array(
        [
            [0.99, 0.01, 0.0],  # max p exactly 0.99: NOT < 0.99 -> auto
            [below, 1.0 - below, 0.0],  # one step below -> engineer
            [above, 1.0 - above, 0.0],  # one step above -> auto
            [0.4, 0.3, 0.3],  # far below -> engineer
        ]
    )
    assert LC.needs_engineer(probs).tolist() == [False, True, False, True]


def test_least_confidence_float32_boundary_matches_float32_comparison():
    probs = np.array([[0.99, 0.01], [0.98, 0.02]], dtype=np.float32)
    expected = probs.max(axis=1) < np.float32(0.99)
    assert LC.needs_engineer(probs).tolist() == expected.tolist() == [False, True]


def test_margin_boundary():
    at = np.array([0.99, 0.99 - 0.98, 0.0])
    assert margin(at[None, :])[0] == 0.98
    step_up = np.nextafter(0.98, 1.0)
    above = np.array([0.99, 0.99 - step_up, 0.0])
    assert margin(above[None, :])[0] > 0.98
    step_down = np.nextafter(0.98, 0.0)
    below = np.array([0.99, 0.99 - step_down, 0.0])
    assert margin(below[None, :])[0] < 0.98
    probs = np.stack([at, above, below, np.array([0.99, 0.01, 0.0])])
    # p1 - p2 exactly 0.98 IS sent to engineers (<=), the next float up is not.
    assert MARGIN.needs_engineer(probs).tolist() == [True, False, True, True]


def test_margin_literal_rows_from_the_brief():
    probs = np.array([[0.99, 0.01, 0], [0.99, 0.01, 0.0]])
    assert MARGIN.needs_engineer(probs).tolist() == [True, True]
    assert LC.needs_engineer(probs).tolist() == [False, False]


def _rows_near(top: float, steps: int) -> np.ndarray:
    """Two-class rows whose top probability walks ``steps`` floats either side of ``top``."""
    values = [top]
    lo = hi = top
    for _ in range(steps):
        lo = np.nextafter(lo, 0.0)
        hi = np.nextafter(hi, 1.0)
        values += [lo, hi]
    p1 = np.array(values)
    return np.stack([p1, 1.0 - p1], axis=1)


def test_presets_equal_the_study_comparisons_near_their_boundaries():
    rng = np.random.default_rng(7)
    lc_rows = _rows_near(0.99, 300)
    assert np.array_equal(LC.needs_engineer(lc_rows), lc_rows.max(axis=1) < 0.99)
    # margin p1 - p2 = 2 p1 - 1 for two classes, near 0.98 when p1 is near 0.99
    m_rows = np.concatenate([_rows_near(0.99, 300), rng.dirichlet(np.ones(3) * 0.05, 2000)[:, :2]])
    m_rows = m_rows[np.abs(m_rows.sum(axis=1) - 1.0) <= 1e-3]
    top2 = np.sort(m_rows, axis=1)[:, ::-1]
    assert np.array_equal(MARGIN.needs_engineer(m_rows), top2[:, 0] - top2[:, 1] <= 0.98)
    h_rows = rng.dirichlet(np.ones(9) * 0.02, size=3000)
    assert np.array_equal(ENTROPY.needs_engineer(h_rows), entropy(h_rows) > 0.05)
    assert 0 < ENTROPY.needs_engineer(h_rows).sum() < len(h_rows)


def test_inclusive_decides_a_score_equal_to_the_threshold():
    row = np.array([[0.9, 0.07, 0.03]])
    h = float(entropy(row)[0])
    assert RoutingRule(Measure.ENTROPY, h).needs_engineer(row).tolist() == [False]
    assert RoutingRule(Measure.ENTROPY, h, inclusive=True).needs_engineer(row).tolist() == [True]
    assert RoutingRule(Measure.ENTROPY, h, inclusive=True).describe() == f"entropy >= {h!r}"


def test_routes_are_route_values():
    probs = np.array([[1.0, 0.0], [0.5, 0.5], [0.995, 0.005]])
    routes = LC.routes(probs)
    assert routes.tolist() == [Route.AUTO, Route.ENGINEER, Route.AUTO]
    assert routes.tolist() == ["auto", "engineer", "auto"]


def test_infinite_thresholds_send_everything_or_nothing():
    probs = np.array([[1.0, 0.0], [0.5, 0.5]])
    everyone = RoutingRule(Measure.MARGIN, -math.inf)
    nobody = RoutingRule(Measure.MARGIN, math.inf)
    assert everyone.needs_engineer(probs).all()
    assert not nobody.needs_engineer(probs).any()
    assert everyone.describe() == "every wafer"
    assert nobody.describe() == "no wafer"


def test_describe_custom_rules():
    assert RoutingRule(Measure.LEAST_CONFIDENCE, 0.25, inclusive=True).describe() == "max p <= 0.75"
    assert RoutingRule(Measure.MARGIN, 0.5).describe() == "p1 - p2 < 0.5"


def test_rule_coerces_measure_strings_and_numpy_thresholds():
    rule = RoutingRule("margin", np.float32(0.5))  # type: ignore[arg-type]
    assert rule.measure is Measure.MARGIN
    assert type(rule.threshold) is float
    assert rule == RoutingRule(Measure.MARGIN, 0.5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"measure": "variance", "threshold": 0.1},
        {"measure": Measure.ENTROPY, "threshold": math.nan},
        {"measure": Measure.ENTROPY, "threshold": "0.1"},
        {"measure": Measure.ENTROPY, "threshold": True},
        {"measure": Measure.ENTROPY, "threshold": 0.1, "inclusive": "yes"},
    ],
)
def test_invalid_rules_raise(kwargs):
    with pytest.raises(ValueError):
        RoutingRule(**kwargs)


def test_invalid_probabilities_raise():
    with pytest.raises(ValueError):
        LC.needs_engineer([[0.5, 0.2]])
    with pytest.raises(ValueError):
        engineer_order([0.5, 0.5], Measure.ENTROPY)


def test_no_wafers():
    assert LC.needs_engineer(np.zeros((0, 9))).shape == (0,)
    assert LC.routes(np.zeros((0, 9))).shape == (0,)
    assert engineer_order(np.zeros((0, 9)), Measure.MARGIN).shape == (0,)


def test_engineer_order_most_uncertain_first_and_stable():
    probs = np.array([[0.8, 0.2], [0.5, 0.5], [0.8, 0.2], [1.0, 0.0], [0.6, 0.4], [0.8, 0.2]])
    order = engineer_order(probs, Measure.LEAST_CONFIDENCE)
    assert order.dtype == np.intp
    assert order.tolist() == [1, 4, 0, 2, 5, 3]
    assert engineer_order(probs, Measure.MARGIN).tolist() == [1, 4, 0, 2, 5, 3]
    assert engineer_order(probs, Measure.ENTROPY).tolist() == [1, 4, 0, 2, 5, 3]
