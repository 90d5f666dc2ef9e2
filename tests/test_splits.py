"""Stratified samples, the study's set split, and train/validation splits."""

import math

import numpy as np
import pytest

from backend.splits import (
    SetOrder,
    StudySplit,
    stratified_sample,
    stratified_train_val,
    study_split,
    unrouted_holdout,
)

# WM-811K's 172,950 labelled wafers per failure type.
WM811K_COUNTS = [147_431, 9_680, 5_189, 4_294, 3_593, 1_193, 866, 555, 149]


def _labels(counts, seed=0):
    labels = np.repeat(np.arange(len(counts)), counts)
    return np.random.default_rng(seed).permutation(labels)


SMALL = _labels([1000, 300, 55, 9, 2, 1])


def _rng(seed=0):
    return np.random.default_rng(seed)


@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.25, 0.5])
def test_stratified_sample_keeps_class_proportions(fraction):
    picked = stratified_sample(SMALL, fraction, _rng())
    assert picked.dtype == np.intp
    assert np.all(np.diff(picked) > 0)  # sorted, no duplicates
    counts = np.bincount(SMALL)
    got = np.bincount(SMALL[picked], minlength=counts.size)
    for count, n in zip(counts, got, strict=True):
        assert abs(n - fraction * count) <= 1
        assert n == max(1, math.floor(fraction * count + 0.5))


def test_stratified_sample_takes_at_least_one_of_every_class():
    picked = stratified_sample(SMALL, 0.01, _rng())
    assert set(SMALL[picked].tolist()) == set(SMALL.tolist())


def test_stratified_sample_extremes():
    assert stratified_sample(SMALL, 0.0, _rng()).size == 0
    assert np.array_equal(stratified_sample(SMALL, 1.0, _rng()), np.arange(SMALL.size))
    assert stratified_sample(np.zeros(0, dtype=int), 0.5, _rng()).size == 0


def test_same_seed_same_sample_other_seed_other_sample():
    a = stratified_sample(SMALL, 0.2, _rng(1))
    b = stratified_sample(SMALL, 0.2, _rng(1))
    c = stratified_sample(SMALL, 0.2, _rng(2))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize(
    ("labels", "fraction", "rng"),
    [
        (np.array([0.0, 1.0]), 0.5, _rng()),
        (np.array([[0, 1]]), 0.5, _rng()),
        (SMALL, 1.5, _rng()),
        (SMALL, -0.1, _rng()),
        (SMALL, 0.5, None),
        (SMALL, 0.5, 42),
    ],
)
def test_stratified_sample_rejects_bad_input(labels, fraction, rng):
    with pytest.raises(ValueError):
        stratified_sample(labels, fraction, rng)


def test_study_split_reproduces_the_study_sizes():
    labels = _labels(WM811K_COUNTS)
    split = study_split(labels, rng=_rng())
    assert split.initial.size == 17_295
    assert [s.size for s in split.sets] == [17_295] * 9
    counts = np.bincount(labels[split.initial])
    assert np.all(np.abs(counts - 0.1 * np.array(WM811K_COUNTS)) <= 1)


@pytest.mark.parametrize("order", list(SetOrder))
def test_sets_partition_the_rest(order):
    split = study_split(SMALL, initial_fraction=0.1, n_sets=4, order=order, rng=_rng())
    everything = np.concatenate([split.initial, split.rest()])
    assert np.array_equal(np.sort(everything), np.arange(SMALL.size))
    assert split.rest().size == sum(s.size for s in split.sets)
    sizes = [s.size for s in split.sets]
    assert max(sizes) - min(sizes) <= 1
    for part in split.sets:
        assert np.all(np.diff(part) > 0)
    assert np.array_equal(split.initial, stratified_sample(SMALL, 0.1, _rng()))


def test_dataset_order_gives_consecutive_ascending_blocks():
    split = study_split(SMALL, n_sets=5, order=SetOrder.DATASET, rng=_rng())
    rest = split.rest()
    assert np.all(np.diff(rest) > 0)
    expected = np.setdiff1d(np.arange(SMALL.size), split.initial)
    assert np.array_equal(rest, expected)


def test_random_order_mixes_the_sets():
    split = study_split(SMALL, n_sets=5, order=SetOrder.RANDOM, rng=_rng())
    assert not np.all(np.diff(split.rest()) > 0)


def test_study_split_is_reproducible():
    a = study_split(SMALL, rng=_rng(3))
    b = study_split(SMALL, rng=_rng(3))
    c = study_split(SMALL, rng=_rng(4))
    assert all(np.array_equal(x, y) for x, y in zip(a.sets, b.sets, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a.sets, c.sets, strict=True))


def test_more_sets_than_wafers_leaves_empty_sets():
    split = study_split(np.array([0, 0, 1]), initial_fraction=0.0, n_sets=5, rng=_rng())
    assert [s.size for s in split.sets] == [1, 1, 1, 0, 0]


def test_split_arrays_are_read_only():
    split = study_split(SMALL, rng=_rng())
    with pytest.raises(ValueError):
        split.initial[0] = 1
    with pytest.raises(ValueError):
        split.sets[0][0] = 1
    assert isinstance(split, StudySplit)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rng": None},
        {"rng": None, "order": SetOrder.DATASET},
        {"n_sets": 0},
        {"n_sets": 2.5},
        {"initial_fraction": 2.0},
        {"order": "alphabetical"},
    ],
)
def test_study_split_rejects_bad_input(kwargs):
    args = {"labels": SMALL, "rng": _rng()}
    args.update(kwargs)
    with pytest.raises(ValueError):
        study_split(**args)


def test_train_val_is_disjoint_complete_and_stratified():
    train, val = stratified_train_val(SMALL, 0.2, _rng())
    assert np.all(np.diff(train) > 0)
    assert np.all(np.diff(val) > 0)
    assert np.intersect1d(train, val).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(SMALL.size))
    counts = np.bincount(SMALL)
    got = np.bincount(SMALL[val], minlength=counts.size)
    assert got.tolist() == [200, 60, 11, 2, 0, 0]  # 0.2*2 rounds to 0; the single wafer trains
    assert set(SMALL[train].tolist()) == set(SMALL.tolist())


def test_train_val_keeps_a_training_wafer_in_every_class():
    labels = np.array([0, 0, 1, 1, 1, 2])
    train, val = stratified_train_val(labels, 0.9, _rng())
    assert sorted(set(labels[train].tolist())) == [0, 1, 2]
    assert np.bincount(labels[val], minlength=3).tolist() == [1, 2, 0]


def test_train_val_is_reproducible():
    a = stratified_train_val(SMALL, 0.3, _rng(8))
    b = stratified_train_val(SMALL, 0.3, _rng(8))
    c = stratified_train_val(SMALL, 0.3, _rng(9))
    assert np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


@pytest.mark.parametrize("fraction", [1.0, -0.5, 1.5])
def test_train_val_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError):
        stratified_train_val(SMALL, fraction, _rng())


def test_stable_holdout_is_stable_and_about_the_fraction() -> None:
    from backend.splits import stable_holdout

    ids = np.arange(1, 20001)
    held = stable_holdout(ids, 0.15)
    assert abs(held.mean() - 0.15) < 0.01
    # The same id gets the same answer whatever else is in the batch.
    assert np.array_equal(stable_holdout(ids[::7], 0.15), held[::7])
    assert not stable_holdout(ids, 0.0001)[:5].any() or stable_holdout(ids, 0.0001).sum() < 10
    with pytest.raises(ValueError):
        stable_holdout(ids.reshape(2, -1), 0.15)


def test_unrouted_holdout_prefers_sets_persons_labelled_completely() -> None:
    # set 0: all person labels (a fair sample); set 1: routed (auto labels and the engineer
    # labels of its most uncertain wafers)
    sets = np.array([0] * 6 + [1] * 6)
    by_person = np.array([True] * 6 + [True, True, False, False, False, False])
    held_out = np.array([True, True, True, False, False, False] * 2)
    fair, unrouted = unrouted_holdout(held_out, by_person, sets, minimum=3)
    assert unrouted
    assert np.flatnonzero(fair).tolist() == [0, 1, 2]
    # too few fair wafers: every held-out wafer, flagged
    fallback, unrouted = unrouted_holdout(held_out, by_person, sets, minimum=4)
    assert not unrouted
    assert fallback.tolist() == held_out.tolist()
    with pytest.raises(ValueError, match="one entry per wafer"):
        unrouted_holdout(held_out[:3], by_person, sets)
