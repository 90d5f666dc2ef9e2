"""Blind audits (backend.audit): who is audited, what an audit concludes, and what it keeps."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from backend.audit import (
    SetAudit,
    accuracy_interval,
    audit_set,
    audit_size,
    cautious_target,
    draw_audit,
    latest_breach,
)
from backend.splits import unrouted_holdout
from backend.wafer_store import SetRouting, WaferStore


def test_audit_size_is_the_fraction_at_least_the_minimum_never_more_than_there_are() -> None:
    assert audit_size(17_000, 0.02, 50) == 340
    assert audit_size(1_000, 0.02, 50) == 50
    assert audit_size(30, 0.02, 50) == 30
    assert audit_size(1_000, 0.0, 50) == 0  # audits off
    assert audit_size(0, 0.02, 50) == 0
    with pytest.raises(ValueError):
        audit_size(10, 1.5, 50)


def test_the_sample_takes_one_rate_in_both_routes_and_repeats_for_one_seed() -> None:
    auto = np.array([True] * 1000 + [False] * 200)
    np.random.default_rng(0).shuffle(auto)
    draw = draw_audit(auto, 0.02, 50, np.random.default_rng(7))
    assert len(draw.audit) == 50 and auto[draw.audit].all()
    # 50 of 1,000 auto wafers is 5%: 5% of the 200 engineer wafers are in the sample too.
    assert len(draw.sampled) == 10 and not auto[draw.sampled].any()
    again = draw_audit(auto, 0.02, 50, np.random.default_rng(7))
    assert draw.audit.tolist() == again.audit.tolist()
    other = draw_audit(auto, 0.02, 50, np.random.default_rng(8))
    assert draw.audit.tolist() != other.audit.tolist()
    nothing = draw_audit(np.zeros(20, bool), 0.02, 50, np.random.default_rng(0))
    assert len(nothing.audit) == len(nothing.sampled) == 0


def test_the_interval_is_the_exact_clopper_pearson_one() -> None:
    # 50 of 50: the lower end solves p^50 = 0.025.
    low, high = accuracy_interval(50, 50, 0.95)
    assert low == pytest.approx(0.025 ** (1 / 50), abs=1e-9) and high == 1.0
    # 0 of 10: the upper end solves (1 - p)^10 = 0.025.
    low, high = accuracy_interval(0, 10, 0.95)
    assert low == 0.0 and high == pytest.approx(1 - 0.025 ** (1 / 10), abs=1e-9)
    assert accuracy_interval(0, 0, 0.95) == (0.0, 1.0)
    with pytest.raises(ValueError):
        accuracy_interval(3, 2, 0.95)


def test_an_audit_counts_only_labelled_audit_wafers_and_states_the_sets_accuracy() -> None:
    audit = audit_set(
        3,
        "v004-set2",
        {10: "none", 11: "Scratch", 12: "Loc", 13: "none"},
        {10: "none", 11: "Edge-Loc", 12: "Loc", 99: "Donut"},  # 13 not yet labelled
        wafers=1000,
        auto_labels=800,
        target_accuracy=0.995,
    )
    assert (audit.audited, audit.agreed, audit.pending) == (3, 2, 1)
    assert audit.accuracy == pytest.approx(2 / 3)
    # Engineer labels count as right: 1 - 0.8 * (1 - 2/3).
    assert audit.labeling_accuracy == pytest.approx(1 - 0.8 / 3)
    low, high = audit.labeling_interval
    assert low < 1 - 0.8 / 3 < high
    assert audit.breached == (high < 0.995)


def test_a_breach_needs_the_upper_end_below_target_and_lasts_until_an_audit_clears() -> None:
    clean = SetAudit(1, "v", 1000, 900, 50, 50, 0, 0.995)
    assert not clean.breached  # 50 of 50: the upper end is 100%
    bad = SetAudit(2, "v", 1000, 900, 50, 45, 0, 0.995)
    assert bad.breached and bad.labeling_interval[1] < 0.995
    # 48 of 50 is worse than the target on its face, but the interval reaches above it.
    doubtful = SetAudit(2, "v", 1000, 900, 50, 48, 0, 0.995)
    assert (doubtful.labeling_accuracy or 1.0) < 0.995 and not doubtful.breached
    assert latest_breach([clean, bad]) == bad
    assert latest_breach([bad, SetAudit(3, "v", 1000, 900, 50, 50, 0, 0.995)]) is None
    # An audit still in progress neither starts nor ends the caution.
    assert latest_breach([bad, SetAudit(3, "v", 1000, 900, 20, 20, 30, 0.995)]) == bad
    assert latest_breach([]) is None
    assert cautious_target(0.995) == pytest.approx(0.9975)


def test_audits_and_routings_with_their_samples_survive_the_wafer_store(tmp_path: Path) -> None:
    store = WaferStore(tmp_path)
    routing = SetRouting(
        2, "v003-set1", "p1 - p2 < 0.1", 0.9, 880, 120, 0, "margin", {501: "none", 7: "Loc"}, (9, 3)
    )
    store.save_routing(routing)
    back = store.routing(2, "v003-set1")
    assert back == routing and back.sample == {501, 7, 9, 3}
    assert store.routings() == [routing]
    # A routing written before audits existed reads as one without a sample.
    (tmp_path / "set-1").mkdir()
    (tmp_path / "set-1" / "routing.json").write_text(
        '{"set_number": 1, "model_version": "v002-set0", "rule": "", "cut": null, "auto": 0,'
        ' "engineer": 5, "unreadable": 0}'
    )
    old = store.routing(1, "v002-set0")
    assert old is not None and old.audit == {} and old.sampled == ()
    audit = SetAudit(2, "v003-set1", 1000, 880, 20, 20, 0, 0.995)
    store.save_audit(audit)
    assert store.audit(2) == audit and store.audits() == [audit]
    (tmp_path / "set-1" / "audit.json").write_text("{not json")
    assert store.audit(1) is None  # unreadable: logged, not trusted


def test_the_random_sample_of_a_routed_set_calibrates_beside_unrouted_sets() -> None:
    sets = np.array([0] * 4 + [1] * 6)
    by_person = np.array([True] * 4 + [True, True, True, False, False, False])
    held_out = np.ones(10, dtype=bool)
    sampled = np.array([False] * 4 + [False, True, True, False, True, False])
    fair, unrouted = unrouted_holdout(held_out, by_person, sets, minimum=1, sampled=sampled)
    # set 0 whole; of set 1 only the sampled wafers a person labelled (8 is sampled but
    # carries only an auto label: it cannot grade anything).
    assert unrouted and np.flatnonzero(fair).tolist() == [0, 1, 2, 3, 5, 6]
    assert math.isclose(fair.mean(), 0.6)
