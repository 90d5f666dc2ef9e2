"""Temperature scaling and ECE, the 8-view summary, the energy novelty score, per-type error
curves and the routing methods built from them (all pure numpy)."""

import numpy as np
import numpy.typing as npt
import pytest

from backend.calibration import calibrate, calibrate_scores
from backend.study.error_curves import (
    cross_fitted_errors,
    fit_class_errors,
    isotonic_increasing,
)
from backend.study.novelty import energy, is_novel, novelty_cut
from backend.study.routing_methods import (
    METHODS,
    Evidence,
    accuracy_curve,
    engineer_share_for,
    route_at_target,
)
from backend.study.symmetric_views import summarize_views, view_uncertainty
from backend.study.temperature import (
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    softmax,
)
from backend.uncertainty import Measure


def overconfident(
    n: int, k: int, rng: np.random.Generator, scale: float = 4.0
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """Logits whose softmax is over-confident: true logits times `scale`, labels drawn from the
    true (unscaled) probabilities."""
    base = rng.normal(size=(n, k))
    p = softmax(base)
    y = np.array([rng.choice(k, p=row) for row in p])
    return base * scale, y


# -- temperature ----------------------------------------------------------------------------
def test_softmax_rows_sum_to_one_and_temperature_flattens():
    z = np.array([[3.0, 1.0, 0.0], [1000.0, 0.0, -1000.0]])
    p = softmax(z)
    assert np.allclose(p.sum(1), 1)
    assert p[1, 0] == pytest.approx(1.0)
    assert softmax(z, 10.0)[0].max() < p[0].max()
    with pytest.raises(ValueError, match="temperature"):
        softmax(z, 0.0)


def test_fit_temperature_recovers_the_scale_of_overconfident_logits():
    z, y = overconfident(20_000, 5, np.random.default_rng(1), scale=4.0)
    t = fit_temperature(z, y)
    assert t == pytest.approx(4.0, rel=0.1)
    assert negative_log_likelihood(z, y, t) < negative_log_likelihood(z, y, 1.0)
    before = expected_calibration_error(softmax(z), y)
    after = expected_calibration_error(softmax(z, t), y)
    assert after < before / 3


def test_fit_temperature_leaves_honest_logits_alone_and_handles_no_wafers():
    z, y = overconfident(20_000, 4, np.random.default_rng(2), scale=1.0)
    assert fit_temperature(z, y) == pytest.approx(1.0, rel=0.1)
    assert fit_temperature(np.zeros((0, 3)), np.zeros(0, np.int64)) == 1.0


def test_ece_closed_cases():
    y = np.array([0, 0, 1, 1])
    sure_right = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert expected_calibration_error(sure_right, y) == 0.0
    sure_wrong = sure_right[::-1]
    assert expected_calibration_error(sure_wrong, y) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="class index outside"):
        expected_calibration_error(sure_right, np.array([0, 0, 1, 2]))


# -- 8 views ----------------------------------------------------------------------------------
def test_views_agreement_and_uncertainty():
    sure = np.array([[1.0, 0.0]] * 8)[:, None, :]  # 8 views, 1 wafer
    split = np.array([[0.9, 0.1]] * 4 + [[0.1, 0.9]] * 4)[:, None, :]
    both = np.concatenate([sure, split], axis=1)
    s = summarize_views(both)
    assert s.agreement[0] == 1.0
    assert s.agreement[1] == 0.5
    u = view_uncertainty(s)
    assert u[0] == pytest.approx(0.0)
    assert u[1] == pytest.approx(1.0)  # mean is 0.5/0.5: no margin at all
    with pytest.raises(ValueError, match="views"):
        summarize_views(np.ones((4, 2)))


# -- novelty ----------------------------------------------------------------------------------
def test_energy_is_higher_for_weak_responses_and_cut_is_a_quantile():
    strong = np.array([[10.0, 0.0, 0.0]])
    weak = np.array([[0.1, 0.0, 0.0]])
    assert energy(weak)[0] > energy(strong)[0]
    assert energy(np.zeros((1, 3)))[0] == pytest.approx(-np.log(3))
    held_out = np.arange(1000, dtype=float)
    cut = novelty_cut(held_out, 0.99)
    assert 985 <= cut <= 991
    assert is_novel(np.array([cut, cut + 1]), cut).tolist() == [False, True]
    assert novelty_cut(np.zeros(0)) == float("inf")


# -- per-type error curves ------------------------------------------------------------------
def test_isotonic_matches_a_brute_force_reference():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 12, 60).astype(float)
    y = (rng.random(60) < x / 12).astype(float)
    knots, values = isotonic_increasing(x, y)
    assert np.all(np.diff(values) >= -1e-12)
    # optimality: the fit's squared error is no worse than any of many random monotone fits
    fitted = values[np.searchsorted(knots, x)]
    best = ((fitted - y) ** 2).sum()
    for _ in range(300):
        trial = np.sort(rng.random(len(knots)))
        assert ((trial[np.searchsorted(knots, x)] - y) ** 2).sum() >= best - 1e-9
    # pooled means: the fit keeps the total
    assert fitted.sum() == pytest.approx(y.sum())


def test_class_errors_give_each_type_its_own_curve():
    rng = np.random.default_rng(4)
    n = 4000
    score = rng.random(n)
    predicted = rng.integers(0, 2, n)
    # type 0's auto labels are never wrong; type 1's are wrong whenever score > 0.5
    correct = (predicted == 0) | (score <= 0.5)
    curves = fit_class_errors(score, predicted, correct, min_wafers=100)
    probe = np.array([0.9, 0.9, 0.2])
    p = curves.error_probability(probe, np.array([0, 1, 1]))
    assert p[0] < 0.01 and p[1] > 0.99 and p[2] < 0.01
    # a type without enough wafers falls back to the pooled curve
    rare = fit_class_errors(score, predicted, correct, min_wafers=n)
    assert rare.curves == {}
    pooled = rare.error_probability(np.array([0.9]), np.array([0]))[0]
    assert 0.3 < pooled < 0.7
    held, _ = cross_fitted_errors(score, predicted, correct, np.random.default_rng(0))
    assert held.shape == (n,)
    assert held[(predicted == 1) & (score > 0.6)].mean() > 0.9


def test_calibrate_scores_is_calibrate_on_any_score():
    rng = np.random.default_rng(5)
    s = rng.random(500)
    ok = rng.random(500) > s * 0.2
    cut = calibrate_scores(s, ok, 0.97, 0.9)
    cal = calibrate(s, ok, Measure.ENTROPY, 0.97, 0.9)
    assert cut.threshold == cal.rule.threshold
    assert cut.predicted_accuracy == cal.predicted_accuracy
    assert cut.needs_engineer(s).tolist() == (s > cal.rule.threshold).tolist()


# -- the routing methods ---------------------------------------------------------------------
def evidence(rng: np.random.Generator, n: int = 3000, m: int = 1500) -> Evidence:
    k = 4

    def draw(count: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        z, y = overconfident(count, k, rng, scale=3.0)
        views = np.stack([z + rng.normal(scale=0.3, size=z.shape) for _ in range(8)])
        return views.astype(np.float32), y

    z, y = draw(n)
    vz, vy = draw(m)
    return Evidence(z, y, vz, vy)


def test_every_method_keeps_its_promise_on_exchangeable_wafers():
    e = evidence(np.random.default_rng(6))
    for name, method in METHODS.items():
        scored = method(e, np.random.default_rng(0))
        assert scored.score.shape == e.true.shape, name
        routed = route_at_target(scored, e.true, e.val_true, 0.95, 0.9)
        accuracy = np.mean(routed.final == e.true)
        assert accuracy >= 0.95 - 0.01, (name, accuracy)  # promise holds (set is a new draw)
        assert 0 < routed.engineer.mean() < 1, name
        assert np.all(routed.final[routed.engineer] == e.true[routed.engineer])


def test_accuracy_curve_and_best_share():
    score = np.array([0.9, 0.1, 0.5, 0.2])
    label = np.array([1, 0, 0, 0])
    true = np.array([0, 0, 1, 0])  # wafers 0 and 2 are wrong; they score highest
    ratio, acc = accuracy_curve(score, label, true)
    assert ratio.tolist() == [0, 0.25, 0.5, 0.75, 1.0]
    assert acc.tolist() == [0.5, 0.75, 1.0, 1.0, 1.0]
    assert engineer_share_for(score, label, true, 0.99) == 0.5
    assert engineer_share_for(score, label, true, 0.5) == 0.0


def test_evidence_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="logits"):
        Evidence(
            np.zeros((8, 3, 2), np.float32),
            np.zeros(4, np.int64),
            np.zeros((8, 1, 2), np.float32),
            np.zeros(1, np.int64),
        )
