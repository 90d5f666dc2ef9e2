"""The labels' own errors (backend.study.label_issues): cleanlab on out-of-sample probabilities."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from backend.label_config import LabelConfig
from backend.sources.cache import LoadReport
from backend.study.label_issues import (
    LabelIssueConfig,
    ranked_issues,
    report_label_issues,
    run_label_issues,
)
from backend.wafers import WaferMaps


def test_flipped_labels_are_found_and_ranked_first() -> None:
    rng = np.random.default_rng(0)
    true = rng.integers(0, 3, size=300)
    probs = np.full((300, 3), 0.05)
    probs[np.arange(300), true] = 0.9
    given = true.copy()
    flipped = np.array([7, 42, 99, 150, 271])
    given[flipped] = (true[flipped] + 1) % 3
    # one doubtful wafer: its label is likely but not sure
    probs[10] = [0.5, 0.3, 0.2]
    given[10] = 0
    found = ranked_issues(given, probs)
    assert set(flipped.tolist()) <= set(found.tolist())
    assert 10 not in found.tolist()
    assert set(found[: len(flipped)].tolist()) == set(flipped.tolist())


def test_a_run_writes_the_table_and_the_sheets_and_resumes_from_its_folds(
    real_wafers: tuple[WaferMaps, LoadReport], label_config: LabelConfig, tmp_path: Path
) -> None:
    wafers = real_wafers[0]
    config = LabelIssueConfig(
        subsample=0.002, folds=2, epochs=1, image_size=16, batch_size=32, per_sheet=6
    )
    said: list[str] = []
    summary = run_label_issues(wafers, label_config, config, tmp_path, log=said.append)
    assert summary["wafers"] == sum(summary["labelled_per_type"].values()) > 300
    with (tmp_path / "label_issues.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == summary["issues"] == sum(summary["per_given_label"].values())
    assert rows, "a one-epoch model disagrees with some labels"
    name_of = dict(zip(wafers.source_row.tolist(), wafers.label_names().tolist(), strict=True))
    for rank, row in enumerate(rows, start=1):
        assert row["source"] == "LSWMD" and int(row["rank"]) == rank
        assert name_of[int(row["wafer_id"])] == row["given_label"]  # the file's own label
        assert row["suggested_label"] in label_config.failure_types
        assert 0.0 <= float(row["given_probability"]) <= 1.0
    # most likely mislabelled first: the given label's probability rises down the table
    given = [float(r["given_probability"]) for r in rows]
    assert given == sorted(given)
    for name, count in summary["per_given_label"].items():
        assert (tmp_path / "sheets" / f"{name}.png").is_file() == (count > 0)
    assert json.loads((tmp_path / "summary.json").read_text())["issues"] == len(rows)
    # a second run takes both folds from disk and finds the same
    said.clear()
    again = run_label_issues(wafers, label_config, config, tmp_path, log=said.append)
    assert sum("taken from" in s for s in said) == 2 and again["issues"] == summary["issues"]
    # another recipe is another run: its folds are computed again
    said.clear()
    other = LabelIssueConfig(**{**config.__dict__, "seed": 1})
    run_label_issues(wafers, label_config, other, tmp_path, log=said.append)
    assert not any("taken from" in s for s in said)


def test_the_command_says_what_it_needs(capsys: pytest.CaptureFixture[str]) -> None:
    from backend.cli import main

    with pytest.raises(SystemExit):
        main(["label-issues"])  # --out is required
    assert "--out" in capsys.readouterr().err


def test_a_demo_runs_wrong_auto_labels_are_counted_among_the_suspects(
    real_wafers: tuple[WaferMaps, LoadReport], label_config: LabelConfig, tmp_path: Path
) -> None:
    wafers = real_wafers[0]
    sample = wafers.subset(np.flatnonzero(wafers.labels >= 0)[:300])
    given = sample.labels.astype(np.int64)
    names = label_config.failure_types
    probs = np.full((300, len(names)), 0.01)
    probs[np.arange(300), given] = 1.0 - 0.01 * (len(names) - 1)
    flipped = np.array([3, 50, 120])  # the model is sure of another type than the given one
    probs[flipped] = 0.01
    probs[flipped, (given[flipped] + 1) % len(names)] = 1.0 - 0.01 * (len(names) - 1)
    ids = sample.source_row
    outside = int(wafers.source_row.max()) + 1  # a wafer without probabilities here
    errors = {"set 1": [int(ids[3]), int(ids[50]), int(ids[7])], "set 2": [outside]}
    summary = report_label_issues(
        sample, given, probs, names, tmp_path, 6, {"probabilities": "made up"}, errors
    )
    suspects = set(ranked_issues(given, probs).tolist())
    assert {3, 50} <= suspects and 7 not in suspects
    assert summary["auto_errors"] == {
        "set 1": {"wrong_auto": 3, "covered": 3, "suspect": 2},
        "set 2": {"wrong_auto": 1, "covered": 0, "suspect": 0},
        "all": {"wrong_auto": 4, "covered": 3, "suspect": 2},
    }
    assert (tmp_path / "sheets" / "auto-errors.png").stat().st_size > 1000
    assert "| all | 4 | 3 | 2 |" in (tmp_path / "results.md").read_text()
