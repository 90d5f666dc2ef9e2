"""Uncertainty measures against closed forms and hand-computed rows."""

import math

import numpy as np
import pytest

from backend.uncertainty import (
    Measure,
    entropy,
    least_confidence,
    margin,
    max_uncertainty,
    uncertainty,
)

MEASURES = list(Measure)


@pytest.mark.parametrize("k", [2, 3, 9, 20])
def test_uniform_rows_are_maximally_uncertain(k):
    probs = np.full((4, k), 1.0 / k)
    assert least_confidence(probs) == pytest.approx(np.full(4, 1.0 - 1.0 / k))
    assert entropy(probs) == pytest.approx(np.full(4, math.log(k)))
    assert margin(probs) == pytest.approx(np.zeros(4), abs=1e-15)
    for measure in MEASURES:
        assert uncertainty(probs, measure) == pytest.approx(np.full(4, max_uncertainty(measure, k)))


@pytest.mark.parametrize("k", [2, 3, 9])
def test_uniform_beats_random_rows(k):
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(k), size=200)
    for measure in MEASURES:
        assert np.all(uncertainty(probs, measure) <= max_uncertainty(measure, k) + 1e-12)


@pytest.mark.parametrize("k", [2, 3, 9])
def test_one_hot_rows_are_certain(k):
    probs = np.eye(k)
    assert np.array_equal(least_confidence(probs), np.zeros(k))
    assert np.array_equal(entropy(probs), np.zeros(k))
    assert np.array_equal(margin(probs), np.ones(k))
    for measure in MEASURES:
        assert np.array_equal(uncertainty(probs, measure), np.zeros(k))


def test_tie_between_top_two_gives_zero_margin():
    probs = np.array([[0.4, 0.2, 0.4], [0.1, 0.45, 0.45], [0.5, 0.5, 0.0]])
    assert np.array_equal(margin(probs), np.zeros(3))
    assert np.array_equal(uncertainty(probs, Measure.MARGIN), np.ones(3))


def test_hand_computed_row():
    probs = np.array([[0.1, 0.7, 0.2]])
    assert least_confidence(probs)[0] == pytest.approx(0.3)
    assert margin(probs)[0] == pytest.approx(0.5)
    expected_h = -(0.1 * math.log(0.1) + 0.7 * math.log(0.7) + 0.2 * math.log(0.2))
    assert entropy(probs)[0] == pytest.approx(expected_h)
    assert uncertainty(probs, Measure.MARGIN)[0] == pytest.approx(0.5)


def test_zero_probabilities_count_as_zero_entropy():
    probs = np.array([[0.5, 0.5, 0.0, 0.0]])
    h = entropy(probs)
    assert np.isfinite(h).all()
    assert h[0] == pytest.approx(math.log(2))


def test_more_confident_row_scores_lower():
    probs = np.array([[0.97, 0.02, 0.01], [0.6, 0.3, 0.1]])
    for measure in MEASURES:
        scores = uncertainty(probs, measure)
        assert scores[0] < scores[1]


def test_float32_softmax_output_is_accepted():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=5.0, size=(1000, 9)).astype(np.float32)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs32 = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
    probs64 = probs32.astype(np.float64)
    for measure in MEASURES:
        scores = uncertainty(probs32, measure)
        assert scores.dtype == np.float64
        assert np.array_equal(scores, uncertainty(probs64, measure))


def test_row_sums_within_tolerance_pass():
    assert least_confidence([[0.5, 0.5004]])[0] == pytest.approx(0.4996)


@pytest.mark.parametrize("measure", MEASURES)
def test_no_wafers_gives_empty_scores(measure):
    scores = uncertainty(np.zeros((0, 9)), measure)
    assert scores.shape == (0,)
    assert scores.dtype == np.float64


@pytest.mark.parametrize(
    "probs",
    [
        [0.5, 0.5],  # 1-D
        [[[0.5, 0.5]]],  # 3-D
        [[1.0], [1.0]],  # one class
        [[0.5, np.nan]],
        [[np.inf, 0.0]],
        [[1.2, -0.2]],  # negative
        [[0.5, 0.4]],  # sums to 0.9
        [[0.6, 0.6]],  # sums to 1.2
        [["a", "b"]],
        [[True, False]],
        np.zeros((2, 0)),
    ],
)
@pytest.mark.parametrize("fn", [least_confidence, margin, entropy])
def test_invalid_probabilities_raise(fn, probs):
    with pytest.raises(ValueError):
        fn(probs)


def test_unknown_measure_raises():
    with pytest.raises(ValueError):
        uncertainty([[0.5, 0.5]], "variance")  # type: ignore[arg-type]


def test_measures_accept_their_string_values():
    probs = [[0.8, 0.2]]
    assert uncertainty(probs, "least-confidence")[0] == pytest.approx(0.2)  # type: ignore[arg-type]
    assert max_uncertainty("margin", 3) == 1.0  # type: ignore[arg-type]


@pytest.mark.parametrize("n_classes", [1, 0, -3, 2.0, True])
def test_max_uncertainty_rejects_bad_class_counts(n_classes):
    with pytest.raises(ValueError):
        max_uncertainty(Measure.ENTROPY, n_classes)
