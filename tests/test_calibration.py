"""Threshold calibration: Wilson bound, closed cases, and a brute-force reference."""

import math
from typing import Any

import numpy as np
import pytest

from backend.calibration import Calibration, calibrate, wilson_upper
from backend.uncertainty import Measure

M = Measure.ENTROPY


def test_wilson_hand_computed_value():
    # z = 1.6448536 (95% one-sided); p = 0.1, n = 10:
    # (0.1 + z^2/20 + z*sqrt(0.009 + z^2/400)) / (1 + z^2/10) = 0.441795 / 1.270554
    assert wilson_upper(1, 10, 0.95) == pytest.approx(0.347719, abs=1e-6)
    # zero errors: z^2 / (n + z^2)
    z2 = 1.6448536269514722**2
    assert wilson_upper(0, 100, 0.95) == pytest.approx(z2 / (100 + z2))


@pytest.mark.parametrize(("k", "n"), [(0, 1), (0, 50), (3, 50), (25, 50), (49, 50), (7, 7)])
def test_wilson_brackets_the_observed_rate(k, n):
    assert wilson_upper(k, n, 0.5) == pytest.approx(k / n)
    previous = k / n
    for confidence in (0.6, 0.8, 0.9, 0.99, 0.999):
        bound = wilson_upper(k, n, confidence)
        assert previous - 1e-12 <= bound <= 1.0
        previous = bound
    if k < n:
        assert wilson_upper(k, n, 0.9) > k / n


def test_wilson_edge_cases():
    assert wilson_upper(0, 0, 0.9) == 1.0
    assert wilson_upper(5, 5, 0.9) == pytest.approx(1.0)
    assert wilson_upper(1, 10_000, 0.9) < wilson_upper(1, 100, 0.9)


@pytest.mark.parametrize(
    ("errors", "n", "confidence"),
    [(3, 2, 0.9), (-1, 5, 0.9), (1, 5, 1.0), (1, 5, 0.4), (1.0, 5, 0.9), (True, 5, 0.9)],
)
def test_wilson_rejects_bad_input(errors, n, confidence):
    with pytest.raises(ValueError):
        wilson_upper(errors, n, confidence)


def test_always_right_model_auto_labels_everything():
    rng = np.random.default_rng(0)
    scores = rng.uniform(0.0, 2.0, size=5000)
    cal = calibrate(scores, np.ones(5000, dtype=bool), M, target_accuracy=0.999)
    assert cal.feasible
    assert cal.rule.threshold == scores.max()
    assert cal.expected_engineer_ratio == 0.0
    assert cal.predicted_accuracy >= 0.999
    assert cal.validation_auto_errors == 0
    assert cal.validation_wafers == 5000


def test_threshold_lands_below_high_scoring_wrong_answers():
    rng = np.random.default_rng(1)
    right = rng.uniform(0.0, 0.5, size=2000)
    wrong = rng.uniform(0.8, 1.0, size=50)
    scores = np.concatenate([right, wrong])
    correct = np.concatenate([np.ones(2000, bool), np.zeros(50, bool)])
    cal = calibrate(scores, correct, M, target_accuracy=0.999, confidence=0.9)
    assert cal.rule.threshold == right.max()
    assert cal.rule.threshold < wrong.min()
    assert cal.validation_auto_errors == 0
    assert cal.expected_engineer_ratio == pytest.approx(50 / 2050)
    assert cal.rule.measure is M
    assert not cal.rule.inclusive


def test_unreachable_target_sends_everything_to_engineers():
    scores = np.linspace(0.0, 1.0, 10)
    correct = np.array([True] * 9 + [False])
    cal = calibrate(scores, correct, M, target_accuracy=0.99, confidence=0.9)
    assert cal.feasible
    assert cal.rule.threshold == -math.inf
    assert cal.expected_engineer_ratio == 1.0
    assert cal.predicted_accuracy == 1.0
    assert cal.validation_auto_errors == 0
    assert cal.rule.needs_engineer(np.array([[1.0, 0.0], [0.5, 0.5]])).all()


def test_empty_inputs_are_infeasible():
    cal = calibrate([], [], M, target_accuracy=0.9)
    assert not cal.feasible
    assert cal.rule.threshold == -math.inf
    assert cal.validation_wafers == 0
    cal = calibrate([0.1, 0.2], [True, True], M, target_accuracy=0.9, new_scores=[])
    assert not cal.feasible


def _reference(scores, correct, target, confidence, new_scores=None):
    """O(n^2) transcription of the selection rule."""
    base = np.asarray(scores if new_scores is None else new_scores)
    best = (0, 1.0, -math.inf, 0)  # (n_auto, predicted, threshold, errors): nothing auto
    for t in sorted(set(scores.tolist())):
        auto = scores <= t
        errors = int((~correct[auto]).sum())
        upper = wilson_upper(errors, int(auto.sum()), confidence)
        n_auto = int((base <= t).sum())
        predicted = 1.0 - n_auto / base.size * upper
        if predicted < target:
            continue
        if n_auto > best[0] or (n_auto == best[0] and predicted > best[1]):
            best = (n_auto, predicted, t, errors)
    return best[2], best[1], 1.0 - best[0] / base.size, best[3]


@pytest.mark.parametrize("seed", range(20))
def test_agrees_with_brute_force_reference(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 300))
    scores = np.round(rng.uniform(0.0, 1.0, n), 2)  # rounding creates ties
    correct = rng.uniform(size=n) > scores * rng.uniform(0.0, 0.4)
    new = np.round(rng.uniform(0.0, 1.0, int(rng.integers(1, 200))), 2) if seed % 2 else None
    target = float(rng.choice([0.5, 0.8, 0.9, 0.95, 0.99, 0.999]))
    confidence = float(rng.choice([0.5, 0.8, 0.9, 0.95]))
    cal = calibrate(scores, correct, M, target, confidence, new_scores=new)
    threshold, predicted, engineer, errors = _reference(scores, correct, target, confidence, new)
    assert cal.rule.threshold == threshold
    assert cal.predicted_accuracy == pytest.approx(predicted)
    assert cal.expected_engineer_ratio == pytest.approx(engineer)
    assert cal.validation_auto_errors == errors


@pytest.mark.parametrize("seed", range(6))
def test_promise_meets_target_and_matches_its_own_numbers(seed):
    rng = np.random.default_rng(100 + seed)
    n = 3000
    scores = rng.exponential(0.2, n)
    correct = rng.uniform(size=n) > np.minimum(scores, 1.0) * 0.3
    for target in (0.9, 0.97, 0.99, 0.995):
        cal = calibrate(scores, correct, M, target, confidence=0.9)
        assert cal.predicted_accuracy >= target
        auto = scores <= cal.rule.threshold
        assert cal.expected_engineer_ratio == pytest.approx(1.0 - auto.mean())
        assert cal.validation_auto_errors == int((~correct[auto]).sum())
        bound = wilson_upper(cal.validation_auto_errors, int(auto.sum()), 0.9)
        assert cal.predicted_accuracy == pytest.approx(1.0 - auto.mean() * bound)


def test_higher_confidence_never_sends_fewer_wafers_to_engineers():
    rng = np.random.default_rng(5)
    scores = rng.exponential(0.3, 4000)
    correct = rng.uniform(size=4000) > np.minimum(scores, 1.0) * 0.2
    ratios = [
        calibrate(scores, correct, M, 0.98, confidence=c).expected_engineer_ratio
        for c in (0.5, 0.6, 0.75, 0.9, 0.95, 0.99, 0.999)
    ]
    assert ratios == sorted(ratios)
    assert ratios[0] < ratios[-1]


def test_auto_fraction_comes_from_the_new_set():
    rng = np.random.default_rng(3)
    scores = rng.uniform(0.0, 1.0, 2000)
    correct = rng.uniform(size=2000) > scores * 0.1
    new = rng.uniform(0.0, 0.3, 500)  # a much easier set than validation
    on_val = calibrate(scores, correct, M, 0.99)
    on_new = calibrate(scores, correct, M, 0.99, new_scores=new)
    assert on_new.expected_engineer_ratio == pytest.approx(np.mean(new > on_new.rule.threshold))
    assert on_new.predicted_accuracy >= 0.99
    assert on_new.expected_engineer_ratio < on_val.expected_engineer_ratio


def test_large_validation_set():
    rng = np.random.default_rng(11)
    n = 150_000
    scores = rng.exponential(0.1, n)
    correct = rng.uniform(size=n) > np.minimum(scores * 2, 1.0)
    cal = calibrate(scores, correct, M, 0.995, new_scores=rng.exponential(0.1, n))
    assert isinstance(cal, Calibration)
    assert cal.predicted_accuracy >= 0.995
    assert 0.0 < cal.expected_engineer_ratio < 1.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target_accuracy": 0.0},
        {"target_accuracy": 1.0},
        {"target_accuracy": 1.5},
        {"confidence": 1.0},
        {"confidence": 0.3},
        {"val_correct": [True, False]},
        {"val_scores": [0.1, math.nan, 0.3]},
        {"val_scores": [[0.1, 0.2, 0.3]]},
        {"val_correct": [0.5, 1.0, 0.0]},
        {"new_scores": [0.1, math.inf]},
        {"measure": "variance"},
    ],
)
def test_invalid_input_raises(kwargs):
    args: dict[str, Any] = {
        "val_scores": [0.1, 0.2, 0.3],
        "val_correct": [True, True, False],
        "measure": M,
        "target_accuracy": 0.9,
    }
    args.update(kwargs)
    with pytest.raises(ValueError):
        calibrate(**args)
