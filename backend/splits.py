"""Which wafers go where: the study's initial set and later sets, and train/validation splits.

Every split works on ``labels``, a 1-D array of integer failure-type indices (one per wafer), and
returns wafer indices into it. Per-class counts are rounded half up (``floor(x + 0.5)``).
Randomness only ever comes from the ``numpy.random.Generator`` passed in, and classes are
visited in ascending order, so a seed fixes the split.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import numpy.typing as npt


def _check_labels(labels: npt.ArrayLike) -> npt.NDArray[np.int64]:
    arr = np.asarray(labels)
    if arr.size == 0 and arr.ndim <= 1:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def _check_fraction(fraction: float, name: str, *, allow_one: bool) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, int | float | np.floating):
        raise ValueError(f"{name} must be a number, got {fraction!r}")
    upper_ok = fraction <= 1.0 if allow_one else fraction < 1.0
    if not (fraction >= 0.0 and upper_ok):
        interval = "[0, 1]" if allow_one else "[0, 1)"
        raise ValueError(f"{name} must be in {interval}, got {fraction!r}")
    return float(fraction)


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def _pick_per_class(
    labels: npt.NDArray[np.int64], how_many: Callable[[int], int], rng: np.random.Generator
) -> npt.NDArray[np.intp]:
    """Sorted indices: ``how_many(count)`` wafers drawn at random from each class."""
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    by_class = np.argsort(labels, kind="stable")
    _, starts, counts = np.unique(labels[by_class], return_index=True, return_counts=True)
    picked: list[npt.NDArray[np.intp]] = [np.zeros(0, dtype=np.intp)]
    for start, count in zip(starts, counts, strict=True):
        members = by_class[start : start + count]
        picked.append(rng.permutation(members)[: how_many(int(count))].astype(np.intp))
    return np.sort(np.concatenate(picked))


def stratified_sample(
    labels: npt.ArrayLike, fraction: float, rng: np.random.Generator
) -> npt.NDArray[np.intp]:
    """Sorted indices of ``round(fraction * count)`` random wafers of every class.

    A class present in ``labels`` always contributes at least one wafer when ``fraction > 0``.
    """
    arr = _check_labels(labels)
    f = _check_fraction(fraction, "fraction", allow_one=True)

    def how_many(count: int) -> int:
        return 0 if f == 0.0 else min(count, max(1, _round_half_up(f * count)))

    return _pick_per_class(arr, how_many, rng)


class SetOrder(StrEnum):
    """How the wafers after the initial set are cut into sets."""

    RANDOM = "random"
    DATASET = "dataset"


def _frozen_indices(values: npt.ArrayLike) -> npt.NDArray[np.intp]:
    arr = np.array(values, dtype=np.intp)
    arr.flags.writeable = False
    return arr


@dataclass(frozen=True, eq=False)
class StudySplit:
    """The study's labelled start and the sets labelled after it, as read-only wafer indices.

    Indices within ``initial`` and within each set are ascending.
    """

    initial: npt.NDArray[np.intp]
    sets: tuple[npt.NDArray[np.intp], ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "initial", _frozen_indices(self.initial))
        object.__setattr__(self, "sets", tuple(_frozen_indices(s) for s in self.sets))

    def rest(self) -> npt.NDArray[np.intp]:
        """All set indices concatenated, in set order."""
        return np.concatenate([np.zeros(0, dtype=np.intp), *self.sets])


def study_split(
    labels: npt.ArrayLike,
    initial_fraction: float = 0.1,
    n_sets: int = 9,
    order: SetOrder = SetOrder.RANDOM,
    rng: np.random.Generator | None = None,
) -> StudySplit:
    """The study's split: a stratified initial set, the remaining wafers cut into ``n_sets``.

    ``RANDOM`` shuffles the remaining wafers with ``rng`` before cutting; ``DATASET`` keeps them in
    index order, so the sets are consecutive blocks (what the original notebooks did). Set sizes
    differ by at most one (the first sets are the larger); sets may be empty if there are fewer
    remaining wafers than sets. ``rng`` is required for both orders: it draws the initial sample.
    """
    arr = _check_labels(labels)
    order = SetOrder(order)
    if isinstance(n_sets, bool) or not isinstance(n_sets, int | np.integer) or n_sets < 1:
        raise ValueError(f"n_sets must be a positive integer, got {n_sets!r}")
    if rng is None:
        raise ValueError("rng is required: it draws the stratified initial sample (and shuffles)")
    initial = stratified_sample(arr, initial_fraction, rng)
    rest_mask = np.ones(arr.size, dtype=np.bool_)
    rest_mask[initial] = False
    rest = np.flatnonzero(rest_mask)
    if order is SetOrder.RANDOM:
        rest = rng.permutation(rest)
    sets = tuple(np.sort(part) for part in np.array_split(rest, int(n_sets)))
    return StudySplit(initial=initial, sets=sets)


def stratified_train_val(
    labels: npt.ArrayLike, val_fraction: float, rng: np.random.Generator
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """Split wafers into (train, validation) indices, class by class.

    Each class sends ``round(val_fraction * count)`` wafers to validation but always keeps at
    least one in training (so a class with a single wafer is training-only). Both arrays are
    sorted, disjoint, and together cover every wafer.
    """
    arr = _check_labels(labels)
    f = _check_fraction(val_fraction, "val_fraction", allow_one=False)

    def how_many(count: int) -> int:
        return min(count - 1, _round_half_up(f * count))

    val = _pick_per_class(arr, how_many, rng)
    train_mask = np.ones(arr.size, dtype=np.bool_)
    train_mask[val] = False
    return np.flatnonzero(train_mask).astype(np.intp), val


#: Knuth's multiplicative hash constant (2^32 / golden ratio).
_GOLDEN = 2654435761


def wafer_key(source: str, wafer_id: int) -> int:
    """A wafer's identity (the file or fab system it came from, its id there) as one stable
    non-negative integer for `stable_holdout`: the same for the same wafer in every project, in
    a re-import, and where Label Studio is out of reach (a first model trained on a GPU box)."""
    digest = hashlib.blake2b(f"{source}\x00{int(wafer_id)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def stable_holdout(ids: npt.ArrayLike, fraction: float) -> npt.NDArray[np.bool_]:
    """True for the ids held out for validation, the same answer for an id every time.

    Unlike a fresh random split per retraining, a wafer held out once is held out always, so a
    model warm-started from an earlier one has never trained on today's validation wafers.
    Roughly `fraction` of any large set of ids is held out.
    """
    f = _check_fraction(fraction, "fraction", allow_one=False)
    arr = np.asarray(ids, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError(f"ids must be 1-D, got shape {arr.shape}")
    hashed = (arr.astype(np.uint64) * np.uint64(_GOLDEN)) % np.uint64(2**32)
    return np.asarray(hashed.astype(np.float64) / 2.0**32 < f, dtype=np.bool_)


#: Held-out wafers from sets nobody routed that calibration needs before it relies on them alone.
MIN_UNROUTED_CALIBRATION_WAFERS = 200


def unrouted_holdout(
    held_out: npt.ArrayLike,
    by_person: npt.ArrayLike,
    set_numbers: npt.ArrayLike,
    minimum: int = MIN_UNROUTED_CALIBRATION_WAFERS,
    sampled: npt.ArrayLike | None = None,
) -> tuple[npt.NDArray[np.bool_], bool]:
    """The held-out wafers to calibrate routing on, and whether they are all from unrouted sets.

    In a set that was routed (any of its wafers carries an auto label), the wafers a person
    labelled are the ones the model was unsure of, so they overstate its error rate at every
    score and make the calibrated cut too cautious (measured on the full study: 15.2% engineer
    labels instead of 12.5% for the same promise). The held-out wafers of sets that persons
    labelled completely are a fair sample, and so are the held-out wafers of a routed set's
    random audit sample (``sampled``: `backend.audit`), which persons labelled whatever their
    route. When there are fewer than ``minimum`` of those, all held-out wafers are used, as
    before (the flag is then False).
    """
    held = np.asarray(held_out, dtype=np.bool_)
    person = np.asarray(by_person, dtype=np.bool_)
    sets = np.asarray(set_numbers, dtype=np.int64)
    if not (held.shape == person.shape == sets.shape) or held.ndim != 1:
        raise ValueError("held_out, by_person and set_numbers need one entry per wafer")
    random = np.zeros(held.shape, np.bool_) if sampled is None else np.asarray(sampled, np.bool_)
    if random.shape != held.shape:
        raise ValueError("sampled needs one entry per wafer")
    routed_sets = np.unique(sets[~person])
    fair = held & (~np.isin(sets, routed_sets) | (random & person))
    if fair.sum() >= minimum:
        return fair, True
    return held, False
