"""The per-set promise: P(a set's labeling accuracy >= target) >= confidence."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest

from backend.calibration import (
    allowed_errors,
    calibrate_scores,
    hypergeometric_cdf,
    largest_rate,
    promise_cut,
)
from backend.study.promise_check import check_promise
from backend.study.routing_methods import Evidence


def test_largest_rate_is_the_exact_clopper_pearson_bound() -> None:
    # 0 errors in n: the bound solves (1 - p)^n = alpha
    for n in (1, 50, 3000):
        assert largest_rate([0], [n], 0.05)[0] == pytest.approx(1 - 0.05 ** (1 / n), rel=1e-9)
    # the binomial tail at the returned rate is the asked probability
    p = float(largest_rate([10], [2000], 0.975)[0])
    tail = sum(math.comb(2000, i) * p**i * (1 - p) ** (2000 - i) for i in range(11))
    assert tail == pytest.approx(0.975, abs=1e-6)
    assert largest_rate([3, 5], [3, 2], 0.5).tolist() == [1.0, 1.0]  # k >= n: any rate


def test_hypergeometric_cdf_matches_scipy() -> None:
    from scipy.stats import hypergeom

    rng = np.random.default_rng(0)
    pop = rng.integers(1, 20_000, 300)
    succ = (rng.random(300) * (pop + 1)).astype(np.int64)
    draws = (rng.random(300) * (pop + 1)).astype(np.int64)
    k = rng.integers(-1, 120, 300)
    ours = hypergeometric_cdf(k, pop, succ, draws)
    theirs = hypergeom.cdf(k, pop, succ, draws)
    assert np.allclose(ours, theirs, atol=1e-9), np.abs(ours - theirs).max()
    with pytest.raises(ValueError):
        hypergeometric_cdf([1], [10], [11], [2])


def test_allowed_errors() -> None:
    assert allowed_errors(2000, 0.995) == 10
    assert allowed_errors(17_295, 0.995) == 86
    assert allowed_errors(199, 0.995) == 0


def population(
    rng: np.random.Generator, n: int, error_rate: float = 0.03
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """Uncertainty scores of a model that is wrong on `error_rate` of the wafers, and more
    uncertain where it is wrong (but not always)."""
    wrong = rng.random(n) < error_rate
    scores = np.where(wrong, rng.beta(2.0, 3.0, n), rng.beta(1.0, 25.0, n))
    return scores, ~wrong


def labeling_accuracy(
    scores: npt.NDArray[np.float64], correct: npt.NDArray[np.bool_], t: float
) -> float:
    auto = scores <= t
    return 1.0 - float((auto & ~correct).sum()) / scores.size


def test_a_perfect_model_auto_labels_nearly_everything() -> None:
    rng = np.random.default_rng(1)
    cut = promise_cut(rng.random(3000), np.ones(3000, bool), rng.random(2000), 0.995, 0.95)
    assert cut.auto_wafers >= 1900 and cut.validation_errors_below == 0


def test_no_evidence_auto_labels_only_what_the_set_may_get_wrong() -> None:
    rng = np.random.default_rng(2)
    cut = promise_cut([], [], rng.random(2000), 0.995, 0.95)
    # without held-out wafers only up to `allowed_errors` wafers may be auto-labelled
    assert cut.auto_wafers <= allowed_errors(2000, 0.995)
    assert promise_cut([0.1], [True], [], 0.995).auto_wafers == 0


def test_a_stronger_promise_never_auto_labels_more() -> None:
    rng = np.random.default_rng(3)
    val, ok = population(rng, 2600)
    new, _ = population(rng, 2000)
    autos = [promise_cut(val, ok, new, 0.995, c).auto_wafers for c in (0.5, 0.8, 0.95, 0.99)]
    assert autos == sorted(autos, reverse=True) and autos[0] > autos[-1]


def test_sets_miss_the_target_no_more_often_than_promised() -> None:
    """Resampled sets of 2,000 wafers calibrated on 2,600 held-out wafers: the share below
    99.5% stays within the promised 5%, where the expected-accuracy cut misses far more."""
    rng = np.random.default_rng(4)
    sets = 200
    missed = {"exact": 0, "union": 0, "expected": 0}
    auto = {"exact": 0, "union": 0}
    for _ in range(sets):
        val, ok = population(rng, 2600)
        new, new_ok = population(rng, 2000)
        for method in ("exact", "union"):
            cut = promise_cut(val, ok, new, 0.995, 0.95, method, grid=64)
            missed[method] += labeling_accuracy(new, new_ok, cut.threshold) < 0.995
            auto[method] += cut.auto_wafers
        expected = calibrate_scores(val, ok, 0.995, 0.9, new)
        missed["expected"] += labeling_accuracy(new, new_ok, expected.threshold) < 0.995
    # 5% of 200 is 10; allow the binomial scatter of the check itself (P(Bin(200,.05) > 17) < 2%)
    assert missed["exact"] <= 17 and missed["union"] <= 17, missed
    assert missed["expected"] > missed["exact"]
    # the exact bound spends the whole failure probability on one bound: more auto labels
    assert auto["exact"] > auto["union"], auto


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target_accuracy": 1.0},
        {"target_accuracy": 0.0},
        {"confidence": 1.0},
        {"confidence": 0.4},
        {"estimate_share": 0.0},
        {"method": "bonferroni"},
    ],
)
def test_bad_promises_are_refused(kwargs: dict[str, float | str]) -> None:
    args: dict[str, float | str] = {"target_accuracy": 0.995, "confidence": 0.95}
    args.update(kwargs)
    with pytest.raises(ValueError):
        promise_cut([0.1], [True], [0.1], **args)  # type: ignore[arg-type]


def evidence(rng: np.random.Generator, n: int) -> Evidence:
    """Two-class logits of a model that is right on ~97% of wafers, surer where it is right."""
    true = rng.integers(0, 2, n)
    right = rng.random(n) > 0.03
    guess = np.where(right, true, 1 - true)
    sure = np.where(right, rng.uniform(2, 9, n), rng.uniform(0, 3, n))
    logits = np.zeros((1, n, 2), np.float32)
    logits[0, np.arange(n), guess] = sure
    return Evidence(
        logits, true.astype(np.int64), logits[:, : n // 2], true[: n // 2].astype(np.int64)
    )


def test_the_promise_check_counts_missed_sets_for_both_rules() -> None:
    rng = np.random.default_rng(5)
    sets = [evidence(rng, 4000) for _ in range(3)]
    figures = check_promise(sets, 0.995, 0.95, resamples=60, set_size=2000)
    assert figures["expected"].sets == figures["promise"].sets == 60
    assert figures["promise-union"].sets == 60
    assert figures["promise"].miss_rate <= 0.05 + 0.05  # 5% promised, scatter of 60 draws
    assert figures["promise"].engineer_ratio <= figures["promise-union"].engineer_ratio
    assert figures["promise"].missed <= figures["expected"].missed
    assert figures["promise"].engineer_ratio >= figures["expected"].engineer_ratio
    assert figures["promise"].worst_accuracy >= figures["expected"].worst_accuracy
