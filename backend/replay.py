"""Bounded retraining: which wafers a retraining after a new set trains on, and for how long.

Layer L0 (numpy only). Retraining from scratch on every labelled wafer costs more with every
set; a bounded retraining continues the previous model instead, on
- the wafers labelled since it was trained (the new wafers), all of them, plus
- a replay sample of earlier wafers, class-balanced (each failure type as equally represented
  as its wafers allow), person labels (engineer or known) before auto labels, so that the model
  does not forget rare failure types that the new set happens to lack,
for at most a fixed number of samples (the phase budget), checked on held-out wafers that a
person labelled. None of these grows with the history: the work of a retraining depends on the
new set's size only.

Wafers are drawn from that pool with `pool_weights`, which give each class the share it would
get when balancing the whole history (so the logit adjustment of the whole history applies).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from backend.splits import stable_holdout

#: Class balance -> p: wafers are drawn with probability proportional to count^-p of their class.
BALANCE_POWER = {"sqrt": 0.5, "inverse": 1.0, "none": 0.0}


@dataclass(frozen=True)
class RetrainPolicy:
    """How much a bounded retraining trains and on what.

    The compute budget is `phase_budget` samples when set, else `samples_per_new_wafer` times
    the new wafers (by default what 5 epochs over the new wafers alone would cost).
    """

    phase_budget: int | None = None
    samples_per_new_wafer: float = 5.0
    #: Replayed earlier wafers per new wafer.
    replay_per_new_wafer: float = 1.0
    #: Stable share of person-labelled wafers held out for checking (never trained on).
    validation_fraction: float = 0.1
    #: At most this many held-out wafers are checked (a random sample of them), so that a
    #: check costs the same whatever the history.
    max_validation: int = 2048
    #: Checks on the held-out wafers spread over the budget; stop after `patience` without gain.
    checks: int = 8
    patience: int = 3
    #: The continued model's peak learning rate, as a share of a fresh training's.
    learning_rate_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.phase_budget is not None and self.phase_budget < 1:
            raise ValueError("phase_budget must be a positive number of samples")
        if self.samples_per_new_wafer <= 0 or self.replay_per_new_wafer < 0:
            raise ValueError("samples_per_new_wafer must be > 0, replay_per_new_wafer >= 0")
        if not 0 <= self.validation_fraction < 1:
            raise ValueError("validation_fraction must be in [0, 1)")
        if not 0 < self.learning_rate_scale <= 10:
            raise ValueError("learning_rate_scale must be in (0, 10]")
        if self.max_validation < 1 or self.checks < 1 or self.patience < 1:
            raise ValueError("max_validation, checks and patience must be at least 1")

    def budget(self, new_wafers: int) -> int:
        """Samples a retraining may see after `new_wafers` newly labelled wafers (0 if none)."""
        if new_wafers <= 0:
            return 0
        if self.phase_budget is not None:
            return self.phase_budget
        return max(1, round(self.samples_per_new_wafer * new_wafers))


@dataclass(frozen=True)
class RetrainPlan:
    """Indices into the labelled wafers: what to train on and what to check on."""

    train: npt.NDArray[np.intp]
    validation: npt.NDArray[np.intp]
    #: Wafers eligible for training (all labelled wafers but the held-out ones): the class
    #: prior the pool is drawn with and corrected for (`pool_weights`, the logit adjustment).
    eligible: npt.NDArray[np.intp]
    new: int
    replay: int
    budget: int
    checks: int = 8
    patience: int = 3
    learning_rate_scale: float = 1.0


def balanced_quota(available: npt.NDArray[np.int64], size: int) -> npt.NDArray[np.int64]:
    """How many wafers to take per class so that classes are as equal as possible.

    Water-filling: every class gets the same quota, classes with fewer wafers give all they
    have and their unused share goes to the others. Takes exactly min(size, total) wafers.
    """
    counts = np.asarray(available, dtype=np.int64)
    if counts.ndim != 1 or (counts.size and counts.min() < 0):
        raise ValueError("available must be a 1-D array of non-negative counts")
    take = np.zeros_like(counts)
    remaining = min(int(size), int(counts.sum()))
    order = [c for c in np.argsort(counts, kind="stable") if counts[c] > 0]
    for i, c in enumerate(order):
        share = -(-remaining // (len(order) - i))  # ceil: the exact total ends on the last class
        take[c] = min(int(counts[c]), share)
        remaining -= int(take[c])
    return take


def replay_sample(
    labels: npt.NDArray[np.integer],
    by_person: npt.NDArray[np.bool_],
    size: int,
    rng: np.random.Generator,
) -> npt.NDArray[np.intp]:
    """Sorted indices of `size` wafers (or all, if fewer), class-balanced (`balanced_quota`);
    within a class, person-labelled wafers first, in random order, then auto-labelled ones."""
    labels = np.asarray(labels)
    if labels.shape != np.shape(by_person) or labels.ndim != 1:
        raise ValueError("labels and by_person must be 1-D and of one length")
    if not len(labels) or size <= 0:
        return np.zeros(0, dtype=np.intp)
    classes, counts = np.unique(labels, return_counts=True)
    quota = balanced_quota(counts, size)
    picked = []
    for c, take in zip(classes, quota, strict=True):
        members = np.flatnonzero(labels == c)
        person = by_person[members]
        ordered = np.concatenate(
            [rng.permutation(members[person]), rng.permutation(members[~person])]
        )
        picked.append(ordered[:take])
    return np.sort(np.concatenate(picked)).astype(np.intp)


def plan_retraining(
    labels: npt.NDArray[np.integer],
    by_person: npt.NDArray[np.bool_],
    is_new: npt.NDArray[np.bool_],
    ids: npt.NDArray[np.integer],
    policy: RetrainPolicy,
    rng: np.random.Generator,
) -> RetrainPlan:
    """The bounded retraining of labelled wafers (one entry each in every array).

    `is_new` marks the wafers labelled since the model that is continued was trained; `ids`
    are stable wafer ids (task ids, dataset rows) that decide the held-out share once and for
    all (`backend.splits.stable_holdout`), so the continued model never trained on them.
    Held out are person-labelled wafers only: the model is not graded against labels that an
    earlier model gave.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if not (len(by_person) == len(is_new) == len(ids) == n):
        raise ValueError("labels, by_person, is_new and ids need one entry per wafer")
    by_person = np.asarray(by_person, dtype=bool)
    is_new = np.asarray(is_new, dtype=bool)
    held_out = (
        stable_holdout(np.asarray(ids, dtype=np.int64), policy.validation_fraction) & by_person
    )
    validation = np.flatnonzero(held_out)
    if len(validation) > policy.max_validation:
        validation = np.sort(rng.choice(validation, policy.max_validation, replace=False))
    new = np.flatnonzero(is_new & ~held_out)
    history = np.flatnonzero(~is_new & ~held_out)
    replay_size = round(policy.replay_per_new_wafer * len(new))
    replay = history[replay_sample(labels[history], by_person[history], replay_size, rng)]
    return RetrainPlan(
        train=np.sort(np.concatenate([new, replay])).astype(np.intp),
        validation=validation.astype(np.intp),
        eligible=np.flatnonzero(~held_out).astype(np.intp),
        new=len(new),
        replay=len(replay),
        budget=policy.budget(len(new)),
        checks=policy.checks,
        patience=policy.patience,
        learning_rate_scale=policy.learning_rate_scale,
    )


def pool_weights(
    pool_labels: npt.NDArray[np.integer],
    reference_labels: npt.NDArray[np.integer],
    n_classes: int,
    balance: str,
) -> npt.NDArray[np.float64]:
    """Per-wafer drawing weights for a training pool, so that each class is drawn with the
    share that balancing `reference_labels` (the whole history) would give it:
    count^(1 - p) with p from `BALANCE_POWER`, spread over the class's wafers in the pool.

    A class of the pool absent from the reference gets weight 0 (cannot happen when the pool
    is part of the reference).
    """
    if balance not in BALANCE_POWER:
        raise ValueError(f"balance must be one of {', '.join(BALANCE_POWER)}")
    pool = np.asarray(pool_labels, dtype=np.int64)
    reference = np.bincount(np.asarray(reference_labels, dtype=np.int64), minlength=n_classes)
    in_pool = np.bincount(pool, minlength=n_classes)
    mass = np.where(reference > 0, reference.astype(np.float64) ** (1 - BALANCE_POWER[balance]), 0)
    per_wafer = np.divide(mass, in_pool, out=np.zeros(n_classes), where=in_pool > 0)
    return per_wafer[pool]
