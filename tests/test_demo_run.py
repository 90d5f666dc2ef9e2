"""`python -m backend demo --simulate-engineers`, small: the whole product on this machine (its
own Label Studio on PostgreSQL when one answers, Redis, gunicorn backend, rq worker), a first
model trained offline on a labelled history, two sets of new wafers labelled through the SDK by
simulated engineers (audit wafers included; three at once after the resume), stopped after the
first set and resumed, and the report the full-scale run writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backend.harness.label_studio_db import choose_database, drop_database
from backend.harness.stack import free_port

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[1]


def finished_sets(out: Path) -> int:
    try:
        return len(json.loads((out / "rows.json").read_text()))
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def test_the_demo_runs_stops_resumes_and_reports_each_set(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    env = os.environ | {"REDIS_URL": "redis://127.0.0.1:6379/9", "PYTHONUNBUFFERED": "1"}
    command = [
        sys.executable, "-m", "backend", "demo", "--simulate-engineers", "--out", str(out),
        "--sets", "2", "--set-size", "150", "--first-model-wafers", "600",
        "--first-model-epochs", "2", "--epochs", "1", "--image-size", "16",
        "--label-studio-port", str(free_port()),
    ]  # fmt: skip
    log = (tmp_path / "first.log").open("w")
    try:
        first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + 1200
        while finished_sets(out) < 1 and first.poll() is None and time.monotonic() < deadline:
            time.sleep(1)
        assert finished_sets(out) == 1, (tmp_path / "first.log").read_text()[-3000:]
        first.send_signal(signal.SIGTERM)  # a stopped run, mid-way through set 2
        assert first.wait(timeout=120) != 0
        set_1 = json.loads((out / "rows.json").read_text())[0]
        # Resuming with other sizes is refused before anything starts
        other = [*command[:-2], "--resume", "--seed", "7"]
        refused = subprocess.run(other, cwd=ROOT, env=env, capture_output=True, text=True)
        assert refused.returncode == 2 and "same sizes and seed" in refused.stderr
        # ... and set 2 is labelled by three engineers at once
        done = subprocess.run(
            [*command, "--resume", "--engineers", "3"], cwd=ROOT, env=env, capture_output=True, text=True,
            timeout=1200,
        )  # fmt: skip
    finally:
        log.close()
        drop_database(choose_database(out / "label-studio", "auto"), out / "label-studio")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "carrying on with the run" in done.stderr and "1 of 2 sets finished" in done.stderr
    assert json.loads((out / "rows.json").read_text())[0] == set_1
    report = json.loads((out / "report.json").read_text())
    assert [s["set"] for s in report["sets"]] == [1, 2]
    for s in report["sets"]:
        assert s["wafers"] == 150
        assert s["engineer_labels"] + s["auto_labels"] == 150
        assert 0 <= s["audit_wafers"] <= s["engineer_labels"]
        assert 0 <= s["true_accuracy"] <= 1 and s["promise_met"] in (True, False)
        assert s["next_set_seconds"] > 0 and s["model_version"]
        wrong = s["wrong_auto_wafers"]
        assert len(wrong) == round(s["auto_labels"] * (1 - (s["auto_label_accuracy"] or 1)))
        assert all(isinstance(w, int) and w >= 0 for w in wrong)
    # set 2 was opened before the stop: its opening is reported all the same
    assert all(s["opening_seconds"] > 0 for s in report["sets"]), report["sets"]
    # every set is learnt by a retraining job, whose whole time holds its read of the labels
    for s in report["sets"]:
        assert 0 < s["label_read_seconds"] < s["retraining_job_seconds"], s
    # each set's labels were read ahead while it was labelled
    assert all(s["read_ahead_seconds"] > 0 for s in report["sets"]), report["sets"]
    assert report["wafers"] == 300
    assert report["engineer_labels"] == sum(s["engineer_labels"] for s in report["sets"])
    table = (out / "results.md").read_text()
    assert table.count("\n| 1 |") == 1 and "| all | 300 |" in table
    # The run's sets routed again by each promise rule, with the models that opened them
    replay = [sys.executable, "-m", "backend", "promise-replay", str(out)]
    replayed = subprocess.run(replay, cwd=ROOT, env=env, capture_output=True, text=True)
    assert replayed.returncode == 0, replayed.stderr[-3000:]
    results = json.loads((out / "promise-replay.json").read_text())
    assert [s["set"] for s in results["sets"]] == [1, 2]
    for s in results["sets"]:
        assert s["wafers"] == 150 and 0 <= s["model_accuracy"] <= 1
        served, exact = s["served_engineer"], s["rules"]["promise"]["engineer"]
        assert abs(served - exact) <= 2, s  # the served cut, up to float noise at the cut
        assert exact <= s["rules"]["promise-union"]["engineer"]
    # The first set routed by one view, 8 views and 8 views of the unsure wafers only
    gate = [sys.executable, "-m", "backend", "view-gate", str(out)]
    gated = subprocess.run(gate, cwd=ROOT, env=env, capture_output=True, text=True)
    assert gated.returncode == 0, gated.stderr[-3000:]
    study = json.loads((out / "view-gate.json").read_text())
    assert study["set"] == 1 and study["wafers"] == 150 and study["held_out_wafers"] > 0
    routes = study["routes"]
    assert [r["measure"] for r in routes[:2]] == ["margin", "eight-views"]
    assert [r["drawings_per_wafer"] for r in routes[:2]] == [1.0, 8.0]
    drawings = [r["drawings_per_wafer"] for r in routes[2:]]
    assert all(1 <= d <= 8 for d in drawings) and drawings == sorted(drawings)
    for r in routes:
        assert 0 <= r["engineer"] <= 150 and 0 <= r["wrong_auto"] <= 150 - r["engineer"]
    assert "| eight-views-when-unsure | 0.99 |" in gated.stdout
