"""The bounded-retraining policy: replay balance, person labels first, budget, held-out wafers."""

import numpy as np
import pytest

from backend.replay import (
    RetrainPolicy,
    balanced_quota,
    plan_retraining,
    pool_weights,
    replay_sample,
)
from backend.splits import stable_holdout


def test_quota_is_equal_per_class_and_small_classes_give_all_they_have() -> None:
    np.testing.assert_array_equal(
        balanced_quota(np.array([1000, 5, 40, 1000]), 100), [32, 5, 32, 31]
    )
    assert balanced_quota(np.array([1000, 5, 40, 1000]), 100).sum() == 100
    np.testing.assert_array_equal(balanced_quota(np.array([10, 0, 3]), 100), [10, 0, 3])
    np.testing.assert_array_equal(balanced_quota(np.array([7, 7, 7]), 9), [3, 3, 3])
    np.testing.assert_array_equal(balanced_quota(np.array([7, 7, 7]), 0), [0, 0, 0])
    with pytest.raises(ValueError, match="non-negative"):
        balanced_quota(np.array([3, -1]), 2)


def test_replay_is_class_balanced_and_prefers_person_labels() -> None:
    rng = np.random.default_rng(0)
    labels = np.array([0] * 900 + [1] * 200 + [2] * 8)
    by_person = np.zeros(len(labels), dtype=bool)
    by_person[::3] = True  # a third labelled by persons, in every class
    picked = replay_sample(labels, by_person, 150, rng)
    assert len(picked) == 150 and len(np.unique(picked)) == 150
    assert np.all(np.diff(picked) > 0)
    np.testing.assert_array_equal(np.bincount(labels[picked]), [71, 71, 8])
    # class 0 has 300 person labels and class 1 has 67: persons first, then auto labels
    assert by_person[picked[labels[picked] == 0]].all()
    class1 = picked[labels[picked] == 1]
    assert by_person[class1].sum() == 67
    # asking for more than there is returns everything
    np.testing.assert_array_equal(replay_sample(labels, by_person, 10_000, rng), np.arange(1108))
    assert len(replay_sample(labels, by_person, 0, rng)) == 0


def test_replay_is_seeded() -> None:
    labels = np.random.default_rng(1).integers(0, 4, 500)
    by_person = np.random.default_rng(2).random(500) < 0.4
    a = replay_sample(labels, by_person, 100, np.random.default_rng(5))
    b = replay_sample(labels, by_person, 100, np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)


def test_budget_depends_on_the_new_wafers_only() -> None:
    assert RetrainPolicy().budget(1000) == 5000
    assert RetrainPolicy(samples_per_new_wafer=2.5).budget(1000) == 2500
    assert RetrainPolicy(phase_budget=4096).budget(1000) == 4096
    assert RetrainPolicy(phase_budget=4096).budget(0) == 0
    with pytest.raises(ValueError, match="phase_budget"):
        RetrainPolicy(phase_budget=0)
    with pytest.raises(ValueError, match="validation_fraction"):
        RetrainPolicy(validation_fraction=1.0)


def history(
    n_old: int, n_new: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = n_old + n_new
    labels = rng.choice(4, size=n, p=[0.85, 0.1, 0.04, 0.01])
    by_person = np.zeros(n, dtype=bool)
    by_person[:300] = True  # the known initial set
    by_person[n_old:] = rng.random(n_new) < 0.2  # engineer labels among the new wafers
    by_person[300:n_old] = rng.random(n_old - 300) < 0.2
    is_new = np.zeros(n, dtype=bool)
    is_new[n_old:] = True
    ids = np.arange(n) + 10_000
    return labels, by_person, is_new, ids


def test_plan_trains_on_every_new_wafer_plus_replay_and_holds_out_persons_only() -> None:
    labels, by_person, is_new, ids = history(3000, 500)
    plan = plan_retraining(
        labels, by_person, is_new, ids, RetrainPolicy(), np.random.default_rng(0)
    )
    held = stable_holdout(ids, 0.1) & by_person
    np.testing.assert_array_equal(plan.validation, np.flatnonzero(held))
    assert by_person[plan.validation].all()
    assert not set(plan.train) & set(plan.validation)
    new = np.flatnonzero(is_new & ~held)
    assert set(new) <= set(plan.train) and plan.new == len(new)
    replay = np.setdiff1d(plan.train, new)
    assert plan.replay == len(replay) == len(new)  # one replayed wafer per new wafer
    assert not is_new[replay].any()
    assert plan.budget == 5 * len(new)
    np.testing.assert_array_equal(plan.eligible, np.flatnonzero(~held))
    # the replay evens out the classes compared with the history (85% class 0)
    assert np.mean(labels[replay] == 0) < 0.5


def test_plan_cost_does_not_grow_with_history() -> None:
    policy = RetrainPolicy(max_validation=100)
    small = plan_retraining(*history(3000, 500), policy, np.random.default_rng(0))
    large = plan_retraining(*history(30_000, 500), policy, np.random.default_rng(0))
    assert len(large.train) == pytest.approx(len(small.train), abs=10)
    assert large.budget == pytest.approx(small.budget, rel=0.05)
    assert len(large.validation) == len(small.validation) == 100


def test_pool_weights_draw_classes_as_balancing_the_whole_history_would() -> None:
    reference = np.array([0] * 900 + [1] * 100)
    pool = np.array([0] * 50 + [1] * 50)  # a class-balanced replay pool
    weights = pool_weights(pool, reference, 3, "sqrt")
    drawn = np.bincount(pool, weights=weights, minlength=3)
    # sqrt balancing of 900:100 draws 30:10, i.e. 0.75 / 0.25
    np.testing.assert_allclose(drawn[:2] / drawn.sum(), [0.75, 0.25])
    none = pool_weights(pool, reference, 3, "none")
    np.testing.assert_allclose(np.bincount(pool, weights=none)[:2] / none.sum(), [0.9, 0.1])
    with pytest.raises(ValueError, match="balance"):
        pool_weights(pool, reference, 3, "log")
