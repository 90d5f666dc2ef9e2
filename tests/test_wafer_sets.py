"""Wafer sets as Label Studio tasks: planning, task building, the truth file."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import pytest

from backend.encoding import resize_nearest
from backend.images import model_input
from backend.label_config import DEFAULT_LABEL_CONFIG, LabelConfig
from backend.labelstudio import LabelStudioClient
from backend.wafer_sets import (
    INITIAL_SET,
    SetPlan,
    choice_result,
    cut_into_sets,
    highest_set,
    import_wafers,
    lot_groups,
    plan_sets,
    read_truth,
    source_name,
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


# ---- new wafers as the next sets --------------------------------------------------------------


def test_lot_groups_keep_lots_together_in_order_of_first_appearance() -> None:
    lots = np.array(["b", "a", "b", "", "c", "a", ""], dtype=np.str_)
    groups = [g.tolist() for g in lot_groups(lots)]
    # b first (row 0), then a (row 1), then the unknown-lot wafer of row 3 alone, c, row 6 alone
    assert groups == [[0, 2], [1, 5], [3], [4], [6]]


def test_cut_by_count_never_splits_a_lot() -> None:
    lots = np.array(["x"] * 3 + ["y"] * 4 + ["z"] * 2 + ["big"] * 7 + ["w"], dtype=np.str_)
    sets = [s.tolist() for s in cut_into_sets(lots, per_set=6)]
    assert sets == [[0, 1, 2], [3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15], [16]]
    for members in cut_into_sets(lots, per_set=6):
        for lot in set(lots[members].tolist()):
            assert set(np.flatnonzero(lots == lot).tolist()) <= set(members.tolist())
    # every wafer exactly once
    everything = np.concatenate(cut_into_sets(lots, per_set=4))
    assert sorted(everything.tolist()) == list(range(len(lots)))


def test_cut_by_lots_per_set() -> None:
    lots = np.array(["a", "a", "b", "c", "c", "c", "d", "e"], dtype=np.str_)
    assert [s.tolist() for s in cut_into_sets(lots, lots_per_set=2)] == [
        [0, 1, 2],
        [3, 4, 5, 6],
        [7],
    ]
    assert cut_into_sets(np.array([], dtype=np.str_), lots_per_set=2) == []


@pytest.mark.parametrize(
    ("per_set", "lots_per_set", "message"),
    [(None, None, "either by count"), (3, 2, "either by count"), (0, None, "positive")],
)
def test_cut_needs_exactly_one_positive_way(
    per_set: int | None, lots_per_set: int | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        cut_into_sets(np.array(["a"], dtype=np.str_), per_set=per_set, lots_per_set=lots_per_set)


def test_source_name_is_the_file_stem_or_a_given_name() -> None:
    assert source_name(Path("/data/LSWMD.zip")) == source_name(Path("LSWMD.pkl")) == "LSWMD"
    assert source_name(Path("x.npz"), "fab-7_2026.12") == "fab-7_2026.12"
    with pytest.raises(ValueError, match="source name"):
        source_name(Path("x.npz"), "has space")


def new_wafers(label_config: LabelConfig, n: int, first_row: int, lot_size: int) -> WaferMaps:
    """`n` unlabelled wafers in whole lots of `lot_size` (the last may be short), wafer ids
    first_row, first_row + 1, ..."""
    rng = np.random.default_rng(first_row)
    return WaferMaps.from_maps(
        [random_map(rng) for _ in range(n)],
        labels=[""] * n,
        classes=label_config.failure_types,
        lots=[f"lot{first_row // lot_size + i // lot_size}" for i in range(n)],
        wafer_index=[1 + i % lot_size for i in range(n)],
        source_row=range(first_row, first_row + n),
    )


def project_wafers(ls: LabelStudioClient, project: int) -> list[dict[str, Any]]:
    """(set, source, wafer_id, lot, annotated) of every task, by task id."""
    return [
        {
            "set": t["data"]["set"],
            "source": t["data"]["source"],
            "wafer_id": t["data"]["wafer_id"],
            "lot": t["data"]["lot"],
            "annotated": bool(t["annotations"]),
        }
        for t in ls.tasks(project)
    ]


@pytest.fixture
def history_project(
    ls: LabelStudioClient, label_config: LabelConfig, wafers: WaferMaps, request: Any
) -> int:
    """A project whose set 0 holds 8 labelled wafers of source 'history'."""
    title = f"import {request.node.name}"[:50]
    project = ls.create_project(title, DEFAULT_LABEL_CONFIG.read_text())
    labelled = np.flatnonzero(wafers.labels >= 0)[:8]
    outcome = import_wafers(
        ls, project, wafers, label_config, [labelled], source="history", initial=True
    )
    assert outcome.imported == {INITIAL_SET: 8}
    return project


@pytest.mark.slow
def test_new_wafers_follow_the_highest_set_and_a_reimport_is_skipped(
    ls: LabelStudioClient, label_config: LabelConfig, history_project: int
) -> None:
    project = history_project
    fresh = new_wafers(label_config, 23, first_row=100, lot_size=5)
    cut = cut_into_sets(fresh.lots, per_set=10)
    first = import_wafers(ls, project, fresh, label_config, cut, source="fab", chunk_size=4)
    # lots of 5 (ids 100-104, 105-109, ...): 10, 10 and the last 3
    assert first.imported == {1: 10, 2: 10, 3: 3}
    assert first.skipped == 0
    assert highest_set(ls, project) == 3

    again = import_wafers(ls, project, fresh, label_config, cut, source="fab", chunk_size=4)
    assert again.imported == {}
    assert again.skipped == 23
    assert "skipped 23" in again.summary()

    # The same wafer ids from another source are other wafers; a later file comes after set 3.
    other = import_wafers(
        ls, project, fresh, label_config, [np.arange(5)], source="fab2", chunk_size=4
    )
    assert other.imported == {4: 5}
    tasks = project_wafers(ls, project)
    assert len(tasks) == 8 + 23 + 5
    keys = [(t["source"], t["wafer_id"]) for t in tasks]
    assert len(set(keys)) == len(keys), "no wafer twice"
    assert all(t["annotated"] == (t["set"] == INITIAL_SET) for t in tasks)
    assert {t["source"] for t in tasks if t["set"] == INITIAL_SET} == {"history"}
    assert sorted(t["wafer_id"] for t in tasks if t["set"] == 1) == list(range(100, 110))


@pytest.mark.slow
def test_an_import_by_lot_never_splits_a_lot(
    ls: LabelStudioClient, label_config: LabelConfig, history_project: int
) -> None:
    fresh = new_wafers(label_config, 17, first_row=200, lot_size=4)
    cut = cut_into_sets(fresh.lots, lots_per_set=2)
    outcome = import_wafers(ls, history_project, fresh, label_config, cut, source="fab")
    assert outcome.imported == {1: 8, 2: 8, 3: 1}
    sets_of_lot: dict[str, set[int]] = {}
    for task in project_wafers(ls, history_project):
        if task["source"] == "fab":
            sets_of_lot.setdefault(task["lot"], set()).add(task["set"])
    assert len(sets_of_lot) == 5
    assert all(len(sets) == 1 for sets in sets_of_lot.values())


@pytest.mark.slow
def test_an_interrupted_import_resumes_without_duplicates(
    ls: LabelStudioClient, label_config: LabelConfig, history_project: int
) -> None:
    fresh = new_wafers(label_config, 14, first_row=300, lot_size=7)
    cut = cut_into_sets(fresh.lots, per_set=7)

    class ImportStoppedError(Exception):
        pass

    def stop_after_first_chunk(set_number: int, count: int) -> None:
        raise ImportStoppedError(f"stopped after a chunk of {count} wafers of set {set_number}")

    with pytest.raises(ImportStoppedError):
        import_wafers(
            ls,
            history_project,
            fresh,
            label_config,
            cut,
            source="fab",
            chunk_size=3,
            after_chunk=stop_after_first_chunk,
        )
    assert len(project_wafers(ls, history_project)) == 8 + 3
    resumed = import_wafers(
        ls, history_project, fresh, label_config, cut, source="fab", chunk_size=3
    )
    assert resumed.skipped == 3
    assert resumed.imported == {1: 4, 2: 7}
    tasks = [t for t in project_wafers(ls, history_project) if t["source"] == "fab"]
    assert sorted(t["wafer_id"] for t in tasks) == list(range(300, 314))
    # the interrupted set was continued, so each lot is one set, as a clean import makes it
    assert {t["set"] for t in tasks if t["lot"] == "lot42"} == {1}
    assert {t["set"] for t in tasks if t["lot"] == "lot43"} == {2}


@pytest.mark.slow
def test_new_wafers_need_a_project_with_set_0(
    ls: LabelStudioClient, label_config: LabelConfig
) -> None:
    project = ls.create_project("import without history", DEFAULT_LABEL_CONFIG.read_text())
    fresh = new_wafers(label_config, 2, first_row=0, lot_size=2)
    with pytest.raises(ValueError, match="holds no set yet"):
        import_wafers(ls, project, fresh, label_config, [np.arange(2)], source="fab")
    with pytest.raises(ValueError, match="no known failure type for set 0"):
        import_wafers(ls, project, fresh, label_config, [np.arange(2)], source="fab", initial=True)
    assert ls.tasks(project) == []
