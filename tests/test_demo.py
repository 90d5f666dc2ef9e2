import dataclasses
import os
import signal
from pathlib import Path

import pytest

from backend.audit import SetAudit
from backend.harness.demo import SetRow, _stop_on_signals, report, results_table
from backend.harness.simulated_engineers import SetCheck


def test_sigterm_stops_the_demo_like_ctrl_c() -> None:
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        _stop_on_signals()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            signal.sigtimedwait([], 0.5)  # let the handler run
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])


def test_results_table_totals() -> None:
    audit = SetAudit(2, "v002-set1", 100, 70, 10, 10, 0, 0.995)
    rows = [
        SetRow(SetCheck(1, 100, 60, 40, 1, 0, "v001-set0"), 5.0, 30.0),
        SetRow(
            SetCheck(2, 100, 30, 70, 0, 0, "v002-set1", predicted=90, predicted_right=81),
            4.0,
            25.5,
            audit,
            0.93,
            retrain_seconds=61.4,
            opening_seconds=12.3,
            retraining_job_seconds=140.2,
            label_read_seconds=55.6,
            read_ahead_seconds=80.4,
        ),
    ]
    table = results_table(rows)
    assert (
        "| 1 | 100 | 60 (60.0%) | - | - | 40 | 1 | 99.00% | MISSED | v001-set0 | 30.0 s |" in table
    )
    assert (
        "| 2 | 100 | 30 (30.0%) | 10 | 100.00% (69.15%-100.00%) | 70 | 0 | 100.00% | met" in table
    )
    assert "| all | 200 | 90 (45.0%) | 10 | | 110 | 1 | 99.50% | 1 of 2 met | | | | | | |" in table
    assert "| 90.00% | 61 s | 140 s (56 s; ahead 80 s) | 12 s |" in table
    assert "| 30.0 s | - | - | - | - |" in table
    figures = report(rows)
    assert figures["sets_below_target"] == 1 and figures["engineer_share"] == 0.45
    two = figures["sets"][1]
    assert (two["audit_wafers"], two["audited_accuracy"], two["cut"]) == (10, 1.0, 0.93)
    assert (two["model_accuracy"], two["retrain_seconds"]) == (0.9, 61.4)
    assert (two["opening_seconds"], figures["sets"][0]["opening_seconds"]) == (12.3, None)
    assert (two["retraining_job_seconds"], two["label_read_seconds"]) == (140.2, 55.6)
    assert (two["read_ahead_seconds"], figures["sets"][0]["read_ahead_seconds"]) == (80.4, None)
    assert two["audited_interval"][0] == pytest.approx(0.025 ** (1 / 10))
    assert figures["sets"][0]["audited_interval"] is None
    # a set finished before a --resume: its next-set time was not seen, and says so
    unseen = SetRow(SetCheck(1, 100, 60, 40, 1, 0, "v001-set0"), 5.0, None)
    assert "| v001-set0 | - |" in results_table([unseen])
    assert report([unseen])["sets"][0]["next_set_seconds"] is None


def test_the_demo_plan_is_a_history_plus_sets_of_the_asked_size() -> None:
    import numpy as np

    from backend.harness.demo import DemoConfig, demo_plan
    from backend.wafers import WaferMaps

    n = 400
    wafers = WaferMaps.from_maps(
        [np.ones((3, 3), np.uint8)] * n, ["Center", "none"] * (n // 2), ("Center", "none")
    )
    config = DemoConfig(
        out=Path("unused"),
        subsample=0.01,
        initial_fraction=0.1,
        sets=3,
        seed=1,
        label_studio_port=8080,
        simulate_engineers=False,
        first_model_wafers=100,
        set_size=50,
    )
    plan = demo_plan(wafers, config)
    initial = plan.members(0)
    assert len(initial) == 100 and (wafers.labels[initial] == 0).sum() == 50
    members = [plan.members(i) for i in (1, 2, 3)]
    assert [len(m) for m in members] == [50, 50, 50]
    everything = np.concatenate([initial, *members])
    assert len(np.unique(everything)) == len(everything)  # no wafer in two sets
    with pytest.raises(ValueError, match="need 6,000"):
        demo_plan(wafers, dataclasses.replace(config, set_size=2000))


def test_job_figures_are_kept_across_a_resume_the_larger_per_set(tmp_path: Path) -> None:
    from backend.harness.demo import (
        JOB_FIGURES,
        OPENINGS_FILE,
        keep_job_seconds,
        more_job_seconds,
        seen_job_seconds,
    )

    assert seen_job_seconds(tmp_path) == {name: {} for name in JOB_FIGURES}
    # A run from before the retraining figures were kept: its opening seconds still count.
    (tmp_path / OPENINGS_FILE).write_text('{"1": 80.5}')
    older = seen_job_seconds(tmp_path)
    assert older == {"opening": {1: 80.5}, "retraining": {}, "label_read": {}, "read_ahead": {}}
    now = {
        "opening": {1: 20.0, 2: 90.0},
        "retraining": {1: 140.0},
        "label_read": {1: 50.0},
        "read_ahead": {1: 30.0},
    }
    merged = more_job_seconds(older, now)
    assert merged == {
        "opening": {1: 80.5, 2: 90.0},
        "retraining": {1: 140.0},
        "label_read": {1: 50.0},
        "read_ahead": {1: 30.0},
    }
    keep_job_seconds(tmp_path, merged)
    assert seen_job_seconds(tmp_path) == merged  # the new file wins over the old one
