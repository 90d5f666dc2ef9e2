"""Wafer sets as Label Studio tasks: planning, task building, the truth file."""

from __future__ import annotations

import csv
from pathlib import Path

import httpx
import numpy as np
import numpy.typing as npt
import pytest

from backend.encoding import resize_nearest
from backend.images import model_input
from backend.label_config import LabelConfig
from backend.wafer_sets import (
    INITIAL_SET,
    SetPlan,
    choice_result,
    plan_sets,
    read_truth,
    wafer_task,
    write_truth,
)
from backend.wafers import WaferMaps

PER_CLASS = 6
SIZE = 16


def random_map(rng: np.random.Generator) -> npt.NDArray[np.uint8]:
    h, w = (int(v) for v in rng.integers(5, 30, size=2))
    return rng.integers(0, 3, size=(h, w), dtype=np.uint8)


@pytest.fixture
def wafers(label_config: LabelConfig) -> WaferMaps:
    """PER_CLASS wafers of every failure type plus two unlabelled ones, in mixed order."""
    rng = np.random.default_rng(3)
    names = [name for name in label_config.failure_types for _ in range(PER_CLASS)]
    names += ["", ""]
    order = rng.permutation(len(names))
    labels = [names[i] for i in order]
    return WaferMaps.from_maps(
        [random_map(rng) for _ in labels],
        labels=labels,
        classes=label_config.failure_types,
        lots=[f"lot{i // 25}" for i in range(len(labels))],
        wafer_index=[1 + i % 25 for i in range(len(labels))],
        source_row=[1000 + 3 * i for i in range(len(labels))],
    )


def plan(wafers: WaferMaps, seed: int = 7) -> SetPlan:
    return plan_sets(wafers, subsample=0.5, initial_fraction=0.34, n_sets=3, seed=seed)


def test_plan_is_deterministic_for_a_seed(wafers: WaferMaps) -> None:
    first, second = plan(wafers), plan(wafers)
    assert first.set_numbers == second.set_numbers == [INITIAL_SET, 1, 2, 3]
    np.testing.assert_array_equal(first.wafers.source_row, second.wafers.source_row)
    for number in first.set_numbers:
        np.testing.assert_array_equal(first.members(number), second.members(number))
    others = [plan(wafers, seed) for seed in range(8, 12)]
    assert any(
        not np.array_equal(first.wafers.source_row, other.wafers.source_row)
        or not np.array_equal(first.members(1), other.members(1))
        for other in others
    )


def test_sets_are_disjoint_and_cover_the_stratified_subsample(
    wafers: WaferMaps, label_config: LabelConfig
) -> None:
    p = plan(wafers)
    n_types = len(label_config.failure_types)
    # Half of every class, never an unlabelled wafer.
    assert len(p.wafers) == n_types * PER_CLASS // 2
    assert p.wafers.class_counts() == dict.fromkeys(label_config.failure_types, PER_CLASS // 2)
    assert (p.wafers.labels >= 0).all()
    assert set(p.wafers.source_row.tolist()) <= set(wafers.source_row.tolist())
    members = [p.members(n) for n in p.set_numbers]
    assert all(m.size for m in members), "every set holds wafers"
    everything = np.concatenate(members)
    assert sorted(everything.tolist()) == list(range(len(p.wafers)))
    # The initial set is stratified: every failure type appears in it.
    initial_types = {int(p.wafers.labels[i]) for i in p.members(INITIAL_SET)}
    assert initial_types == set(range(n_types))
    with pytest.raises(ValueError, match="no set 4"):
        p.members(4)


def test_plan_needs_labelled_wafers(label_config: LabelConfig) -> None:
    unlabelled = WaferMaps.from_maps(
        [np.ones((3, 3), np.uint8)] * 2, labels=["", ""], classes=label_config.failure_types
    )
    with pytest.raises(ValueError, match="no labelled wafers"):
        plan_sets(unlabelled, subsample=1.0, initial_fraction=0.5, n_sets=1, seed=0)


def test_initial_task_carries_the_true_label_and_others_none(
    wafers: WaferMaps, label_config: LabelConfig
) -> None:
    p = plan(wafers)
    i = int(p.members(INITIAL_SET)[0])
    initial = wafer_task(p.wafers, i, INITIAL_SET, label_config, with_label=True)
    truth = p.wafers.classes[int(p.wafers.labels[i])]
    assert initial["annotations"] == [{"result": choice_result(label_config, truth)}]
    [item] = initial["annotations"][0]["result"]
    assert item["from_name"] == label_config.from_name
    assert item["to_name"] == label_config.to_name
    assert item["value"] == {"choices": [truth]}
    data = initial["data"]
    assert data["set"] == INITIAL_SET
    assert data["wafer_id"] == int(p.wafers.source_row[i])
    assert data["lot"] == str(p.wafers.lots[i])
    assert data["wafer_index"] == int(p.wafers.wafer_index[i])

    j = int(p.members(2)[0])
    later = wafer_task(p.wafers, j, 2, label_config, with_label=False)
    assert "annotations" not in later
    assert later["data"]["set"] == 2
    assert later["data"]["wafer_id"] == int(p.wafers.source_row[j])


def test_an_unlabelled_wafer_cannot_carry_a_label(
    wafers: WaferMaps, label_config: LabelConfig
) -> None:
    i = int(np.flatnonzero(wafers.labels < 0)[0])
    with pytest.raises(ValueError, match="no known failure type"):
        wafer_task(wafers, i, INITIAL_SET, label_config, with_label=True)


def test_task_picture_decodes_to_the_model_input(
    wafers: WaferMaps, label_config: LabelConfig
) -> None:
    p = plan(wafers)
    with httpx.Client() as http:
        for number in (INITIAL_SET, 1):
            for i in p.members(number)[:3]:
                task = wafer_task(p.wafers, int(i), number, label_config, with_label=False)
                value = task["data"][label_config.image_value]
                assert value.startswith("data:image/png;base64,")
                codes = model_input(value, http, label_studio_url=None, api_key=None, size=SIZE)
                expected = resize_nearest(p.wafers.die_map(int(i)), SIZE)
                np.testing.assert_array_equal(codes, expected)


def test_choice_result_rejects_an_unknown_failure_type(label_config: LabelConfig) -> None:
    assert choice_result(label_config, "Donut")[0]["value"] == {"choices": ["Donut"]}
    with pytest.raises(ValueError, match="'Crack'"):
        choice_result(label_config, "Crack")
    with pytest.raises(ValueError):
        choice_result(label_config, "donut")


def test_truth_round_trip(wafers: WaferMaps, tmp_path: Path) -> None:
    p = plan(wafers)
    path = write_truth(tmp_path / "run" / "truth.csv", p)
    assert path.is_file()
    expected = {
        int(p.wafers.source_row[i]): p.wafers.classes[int(p.wafers.labels[i])]
        for i in range(len(p.wafers))
    }
    assert read_truth(path) == expected
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(p.wafers)
    set_of = {int(r["wafer_id"]): int(r["set"]) for r in rows}
    for number in p.set_numbers:
        for i in p.members(number):
            assert set_of[int(p.wafers.source_row[i])] == number


def test_read_truth_refuses_another_csv(tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("wafer,label\n1,Donut\n")
    with pytest.raises(ValueError, match="not a truth file"):
        read_truth(wrong)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ValueError, match="not a truth file"):
        read_truth(empty)
