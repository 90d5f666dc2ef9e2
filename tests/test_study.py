"""A tiny end-to-end study on real WM-811K wafers: the bookkeeping must add up.

Small subsample, small backbone and input, one epoch: the numbers are poor, the accounting is not.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from backend.cli import main
from backend.routing import STUDY_RULES
from backend.sources.cache import LoadReport
from backend.uncertainty import Measure
from backend.wafers import WaferMaps

pytestmark = pytest.mark.slow

FLAGS = [
    "--subsample",
    "0.004",
    "--sets",
    "3",
    "--backbone",
    "resnet18",
    "--image-size",
    "32",
    "--epochs",
    "1",
    "--device",
    "cpu",
    "--seed",
    "3",
]


@pytest.fixture(scope="module")
def study(
    tmp_path_factory: pytest.TempPathFactory,
    real_wafers: tuple[WaferMaps, LoadReport],
    real_cache_dir: Path,
) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("study")
    args = ["simulate", "--cache-dir", str(real_cache_dir), *FLAGS, "--out", str(out)]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    return {
        "out": out,
        "results": results,
        "args": args,
        "methods": {m["name"]: m for m in results["methods"]},
    }


def test_totals_add_up_for_every_method(study: dict[str, Any]) -> None:
    sets = study["results"]["wafers"]["sets"]
    assert len(sets) == 3
    for m in study["methods"].values():
        assert m["total"] == sum(sets), m["name"]
        assert m["engineer_labels"] + m["auto_labels"] == m["total"]
        assert 0 <= m["errors"] <= m["auto_labels"]
        assert m["accuracy"] == pytest.approx(1 - m["errors"] / m["total"])
        assert m["engineer_ratio"] == pytest.approx(m["engineer_labels"] / m["total"])
        assert [s["total"] for s in m["per_set"]] == sets
        for key in ("engineer_labels", "errors"):
            assert sum(s[key] for s in m["per_set"]) == m[key]
        assert 0 <= m["macro_f1"] <= 1


def test_baselines_are_what_they_claim(study: dict[str, Any]) -> None:
    methods = study["methods"]
    active = methods["active learning"]
    assert (active["engineer_ratio"], active["accuracy"], active["errors"]) == (1.0, 1.0, 0)
    assert active["macro_f1"] == 1.0
    auto = methods["auto labeling"]
    assert auto["engineer_labels"] == 0 and auto["engineer_ratio"] == 0.0
    for measure in ("least-confidence", "margin", "entropy", "calibrated"):
        ours = methods[
            next(n for n in methods if n.startswith(measure) or n.startswith(f"{measure} "))
        ]
        random = methods[f"random at {measure} budget"]
        assert [s["engineer_labels"] for s in random["per_set"]] == [
            s["engineer_labels"] for s in ours["per_set"]
        ]


def test_engineer_labels_count_as_correct_and_errors_are_wrong_auto_labels(
    study: dict[str, Any],
) -> None:
    out: Path = study["out"]
    rows = list(csv.DictReader((out / f"data_{study['results']['wafers']['all']}.csv").open()))
    failure_types = study["results"]["failure_types"]
    true = np.array([failure_types.index(r["failure_type"]) for r in rows])
    set_of = np.array([int(r["set"]) for r in rows])
    for loop, name in [("margin", "margin (retrained)"), ("entropy", "entropy (retrained)")]:
        for k, figures in enumerate(study["methods"][name]["per_set"], start=1):
            with np.load(out / "phases" / loop / f"set{k}.npz") as phase:
                probs, engineer = phase["probs"], phase["engineer"]
            # the stored routing is the study's rule applied to the stored probabilities
            np.testing.assert_array_equal(
                engineer, STUDY_RULES[Measure(loop)].needs_engineer(probs)
            )
            # set k's wafers are predicted in ascending wafer order, as the manifest lists them
            set_true = true[set_of == k]
            assert len(set_true) == len(probs)
            assert figures["engineer_labels"] == int(engineer.sum())
            wrong_auto = (~engineer) & (probs.argmax(1) != set_true)
            assert figures["errors"] == int(wrong_auto.sum())


def test_set_one_is_predicted_by_the_shared_initial_model(study: dict[str, Any]) -> None:
    methods = study["methods"]
    for measure in ("least-confidence", "margin", "entropy"):
        retrained = methods[f"{measure} (retrained)"]["per_set"][0]
        reject = methods[f"reject option, {measure}"]["per_set"][0]
        assert retrained == reject


def test_manifests_plots_and_tables_are_written(study: dict[str, Any]) -> None:
    out: Path = study["out"]
    wafers = study["results"]["wafers"]
    counts = {}
    for name in (wafers["all"], wafers["initial"], sum(wafers["sets"])):
        with (out / f"data_{name}.csv").open() as handle:
            counts[name] = sum(1 for _ in handle) - 1
    assert counts == {
        wafers["all"]: wafers["all"],
        wafers["initial"]: wafers["initial"],
        sum(wafers["sets"]): sum(wafers["sets"]),
    }
    for png in ("accuracy_vs_engineer_ratio", "engineer_labels_per_set", "auto_label_confusion"):
        assert (out / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "results.md").read_text()
    assert "| active learning |" in table and "99.27%" in table


def test_a_finished_run_resumes_without_retraining(
    study: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    out: Path = study["out"]
    phase_files = sorted((out / "phases").rglob("*.npz"))
    stamps = [p.stat().st_mtime_ns for p in phase_files]
    assert main(study["args"]) == 0
    assert [p.stat().st_mtime_ns for p in phase_files] == stamps
    again = json.loads((out / "results.json").read_text())
    assert again["methods"] == study["results"]["methods"]
    assert "| margin (retrained) |" in capsys.readouterr().out


def test_other_settings_in_the_same_directory_are_refused(
    study: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    args = [a if a != "3" else "4" for a in study["args"]]  # --sets 4 and --seed 4
    assert main(args) == 2
    assert "holds a study run with other settings" in capsys.readouterr().err


def test_calibrating_on_the_initial_hold_out_needs_bounded_retraining(
    tmp_path: Path, real_cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["simulate", "--cache-dir", str(real_cache_dir), *FLAGS, "--calibrate-on", "initial"]
    assert main([*args, "--out", str(tmp_path)]) == 2
    assert "needs --retrain bounded" in capsys.readouterr().err


def test_warm_retraining_continues_the_previous_model(
    tmp_path: Path, real_wafers: tuple[WaferMaps, LoadReport], real_cache_dir: Path
) -> None:
    flags = [f if f != "3" else "2" for f in FLAGS]  # two sets, seed 2
    args = [
        "simulate",
        "--cache-dir",
        str(real_cache_dir),
        *flags,
        "--retrain",
        "warm",
        "--loops",
        "margin",
        "--out",
        str(tmp_path),
    ]
    assert main(args) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert json.loads((tmp_path / "config.json").read_text())["retrain"] == "warm"
    names = [m["name"] for m in results["methods"]]
    assert names[:2] == ["margin (retrained)", "random at margin budget"]
    assert (tmp_path / "models" / "margin.pt").is_file()
    # the set-2 model trained on the initial set plus set 1
    phases = results["phases"]["margin"]
    assert phases[1]["train_wafers"] > phases[0]["train_wafers"]


def test_bounded_retraining_trains_new_wafers_and_a_replay_within_its_budget(
    tmp_path: Path, real_wafers: tuple[WaferMaps, LoadReport], real_cache_dir: Path
) -> None:
    args = [
        "simulate",
        "--cache-dir",
        str(real_cache_dir),
        *FLAGS,
        "--retrain",
        "bounded",
        "--loops",
        "margin,calibrated",
        "--calibrate-on",
        "initial",
        "--out",
        str(tmp_path),
    ]
    assert main(args) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["retrain"] == "bounded"
    assert results["config"]["phase_budget"] is None  # epochs x new wafers
    assert (tmp_path / "models" / "margin.pt").is_file()
    sets = results["wafers"]["sets"]
    rows = list(csv.DictReader((tmp_path / f"data_{results['wafers']['all']}.csv").open()))
    true = np.array([results["failure_types"].index(r["failure_type"]) for r in rows])
    set_of = np.array([int(r["set"]) for r in rows])
    phases = results["phases"]["margin"]
    for k, phase in enumerate(phases, start=1):
        assert phase["train_samples"] > 0 and phase["train_seconds"] > 0
        assert 0 <= phase["validation_accuracy"] <= 1
        with np.load(tmp_path / "phases" / "margin" / f"set{k}.npz") as data:
            probs = data["probs"]
        assert phase["set_accuracy"] == pytest.approx(np.mean(probs.argmax(1) == true[set_of == k]))
        if k == 1:
            continue
        # set k's model continued on set k-1 (minus its held-out engineer labels) and a replay
        assert phase["new_wafers"] <= sets[k - 2]
        assert 0 < phase["replay_wafers"] <= phase["new_wafers"]
        assert phase["train_wafers"] == phase["new_wafers"] + phase["replay_wafers"]
        assert phase["phase_budget"] == phase["new_wafers"]  # --epochs 1
        assert phase["train_samples"] <= max(phase["phase_budget"], 64)
        assert 0 <= phase["best_samples"] <= phase["train_samples"]
    # a finished run resumes without training again
    stamps = [p.stat().st_mtime_ns for p in sorted((tmp_path / "phases").rglob("*.npz"))]
    assert main(args) == 0
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "phases").rglob("*.npz"))] == stamps

    # the routing study calibrates every set's cut on the initial set's held-out wafers, which
    # no model of a bounded run trained on
    # its calibrated cut was chosen on the initial set's random held-out wafers
    ours = next(m for m in results["methods"] if m["name"] == "calibrated margin (ours)")
    assert "on the initial hold-out" in ours["rule"]
    routing = ["routing-study", str(tmp_path), "--cache-dir", str(real_cache_dir)]
    assert main([*routing, "--views", "1", "--reject-option-views", "0"]) == 0
    with np.load(tmp_path / "phases" / "initial.npz") as initial:
        held_out = initial["val_members"]
    for k in range(1, len(sets) + 1):
        with np.load(tmp_path / "routing-study" / f"evidence-set{k}-initial.npz") as evidence:
            assert evidence["val_true"].tolist() == true[held_out].tolist()
            assert evidence["logits"].shape[:2] == (1, sets[k - 1])
    routed = json.loads((tmp_path / "routing-study" / "initial" / "results.json").read_text())
    assert {m["scope"] for m in routed["methods"]} == {"loop"}
    assert "8 views" not in {m["name"] for m in routed["methods"]}  # one drawing only


def test_routing_study_compares_methods_on_the_calibrated_loops_models(
    study: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    out: Path = study["out"]
    results = study["results"]
    # each calibrated phase keeps its model and the held-out wafers its routing was calibrated on
    for k in range(1, len(results["wafers"]["sets"]) + 1):
        assert (out / "models" / "calibrated" / f"set{k}.pt").is_file()
        with np.load(out / "phases" / "calibrated" / f"set{k}.npz") as data:
            assert len(data["val_members"]) == len(data["val_true"]) == len(data["val_probs"]) > 0
    cache = study["args"][study["args"].index("--cache-dir") + 1]
    # a run that retrains from scratch trains later models on the initial set's held-out wafers
    assert main(["routing-study", str(out), "--cache-dir", cache]) == 2
    assert "only held out of every model in a --retrain bounded run" in capsys.readouterr().err
    assert main(["routing-study", str(out), "--cache-dir", cache, "--hold-out", "phase"]) == 0
    assert "| per-type 8 views + novelty | loop |" in capsys.readouterr().out
    routed = json.loads((out / "routing-study" / "phase" / "results.json").read_text())
    loop_wafers = sum(results["wafers"]["sets"])
    names = {(m["name"], m["scope"]) for m in routed["methods"]}
    assert ("8 views", "loop") in names and ("margin", "reject option") in names
    # the reject option is predicted in one drawing by default, so no 8-view methods there
    assert ("8 views", "reject option") not in names
    for m in routed["methods"]:
        assert m["total"] == loop_wafers
        assert m["engineer_labels"] + m["auto_labels"] == m["total"]
        assert 0 <= m["best_cut_engineer_ratio_for_study_best"] <= 1
        assert m["curve"]["engineer_ratio"][0] == 0 and m["curve"]["engineer_ratio"][-1] == 1
        assert m["curve"]["accuracy"][-1] == 1.0
    # plain margin on the kept models agrees with the loop's own routing measure and predictions
    margin = next(m for m in routed["methods"] if m["name"] == "margin" and m["scope"] == "loop")
    assert margin["model_accuracy"] == pytest.approx(
        np.mean([p["set_accuracy"] for p in results["phases"]["calibrated"]]), abs=0.02
    )
    assert len(routed["calibration"]) == len(results["wafers"]["sets"]) + 1  # and the reject option
    assert all(c["ece_after"] <= c["ece_before"] + 0.05 for c in routed["calibration"])
    assert (
        out / "routing-study" / "phase" / "accuracy_vs_engineer_ratio.png"
    ).stat().st_size > 10_000
    assert (out / "routing-study" / "evidence-set1-phase.npz").is_file()
