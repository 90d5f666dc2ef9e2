"""The wafer store: die maps by task id, written per imported chunk, read by set or by task."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest

from backend.wafer_store import SetRouting, WaferStore
from backend.wafers import WaferMaps

CLASSES = ("Center", "none")


def wafers(n: int, seed: int = 0, first_row: int = 100) -> WaferMaps:
    rng = np.random.default_rng(seed)
    maps = [
        rng.integers(0, 3, size=(int(rng.integers(3, 9)), int(rng.integers(3, 9))))
        for _ in range(n)
    ]
    return WaferMaps.from_maps(
        maps,
        [""] * n,
        CLASSES,
        lots=[f"lot{i // 3}" for i in range(n)],
        wafer_index=[i % 25 + 1 for i in range(n)],
        source_row=list(range(first_row, first_row + n)),
    )


def test_a_set_reads_back_exactly_what_was_stored(tmp_path: Path) -> None:
    store = WaferStore.for_project(tmp_path, 3)
    assert store.root == tmp_path / "projects" / "3" / "wafers"
    first, second = wafers(5, seed=1), wafers(4, seed=2, first_row=200)
    store.add(1, [10, 11, 12, 13, 14], "LSWMD", first)
    store.add(1, [20, 21, 22, 23], "fab", second)
    store.add(2, [30], "fab", wafers(1, seed=3))
    assert store.sets() == [1, 2]
    got = store.read_set(1, CLASSES)
    assert got.task_ids.tolist() == [10, 11, 12, 13, 14, 20, 21, 22, 23]
    assert got.sources.tolist() == ["LSWMD"] * 5 + ["fab"] * 4
    assert got.maps.source_row.tolist() == [*range(100, 105), *range(200, 204)]
    for i in range(5):
        np.testing.assert_array_equal(got.maps.die_map(i), first.die_map(i))
    for i in range(4):
        np.testing.assert_array_equal(got.maps.die_map(5 + i), second.die_map(i))
    assert got.maps.lots.tolist()[:3] == ["lot0"] * 3
    assert (got.maps.labels == -1).all()


def test_lookup_takes_only_the_tasks_asked_for_in_task_order(tmp_path: Path) -> None:
    store = WaferStore(tmp_path)
    stored = wafers(6)
    store.add(1, [15, 11, 13, 10, 12, 14], "LSWMD", stored)
    store.add(2, [40, 41], "LSWMD", wafers(2, seed=5))
    got = store.lookup([1, 2], [14, 10, 41, 99, 12], CLASSES)
    assert got.task_ids.tolist() == [10, 12, 14, 41]  # 99 has no entry: read elsewhere
    np.testing.assert_array_equal(got.maps.die_map(0), stored.die_map(3))
    np.testing.assert_array_equal(got.maps.die_map(2), stored.die_map(5))
    assert len(store.lookup([3], [10], CLASSES)) == 0  # a set with nothing stored
    assert len(store.lookup([1], [], CLASSES)) == 0


def test_a_chunk_stored_twice_after_a_crash_counts_once(tmp_path: Path) -> None:
    store = WaferStore(tmp_path)
    store.add(1, [1, 2, 3], "LSWMD", wafers(3))
    store.add(1, [2, 3, 4], "LSWMD", wafers(3, seed=9))
    assert store.lookup([1], [1, 2, 3, 4], CLASSES).task_ids.tolist() == [1, 2, 3, 4]


def test_a_damaged_file_is_skipped_never_trusted_in_part(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = WaferStore(tmp_path)
    good = store.add(1, [1, 2], "LSWMD", wafers(2))
    bad = store.add(1, [5, 6], "LSWMD", wafers(2, seed=4))
    bad.write_bytes(bad.read_bytes()[:40])
    (bad.parent / "notes.txt").write_text("not a chunk")
    with caplog.at_level(logging.ERROR):
        got = store.read_set(1, CLASSES)
    assert got.task_ids.tolist() == [1, 2]
    assert "unreadable" in caplog.text and bad.name in caplog.text
    assert good.exists()


def test_stored_files_are_written_whole(tmp_path: Path) -> None:
    store = WaferStore(tmp_path)
    store.add(1, [7], "LSWMD", wafers(1))
    names = [p.name for p in store.set_dir(1).iterdir()]
    assert names == ["7-7.npz"]  # no temporary file left behind


def test_bad_input_is_refused(tmp_path: Path) -> None:
    store = WaferStore(tmp_path)
    with pytest.raises(ValueError, match="2 task ids for 3 wafers"):
        store.add(1, [1, 2], "LSWMD", wafers(3))
    with pytest.raises(ValueError, match="not a Label Studio project"):
        WaferStore.for_project(tmp_path, 0)
    with pytest.raises(ValueError, match="set numbers"):
        store.set_dir(-1)


def test_routing_is_kept_per_set_and_model_version(tmp_path: Path) -> None:
    store = WaferStore(tmp_path)
    assert store.routing(1, "v1") is None
    routing = SetRouting(1, "v1", "p1 - p2 < 0.9", 0.8125, auto=90, engineer=10, unreadable=1)
    store.save_routing(routing)
    assert store.routing(1, "v1") == routing
    assert store.routing(1, "v2") is None  # another model's routing does not apply
    nobody = SetRouting(2, "v1", "every wafer", None, auto=0, engineer=5, unreadable=0)
    store.save_routing(nobody)
    assert store.routing(2, "v1") == nobody
    (store.set_dir(1) / "routing.json").write_text("{garbage")
    assert store.routing(1, "v1") is None


def test_a_sets_routing_is_written_once_per_model_version(tmp_path: Path) -> None:
    """Before: every pre-annotation of a set saved its routing, so a catch-up of 5 wafers (a
    lost TASKS_CREATED) replaced cut 0.98530 / 8 auto / 559 engineer by "every wafer", cut
    null, 5 engineer."""
    store = WaferStore(tmp_path)
    first = SetRouting(1, "v1", "p1 - p2 < 0.9", 0.98530, 8, 559, 0, measure="margin")
    assert store.keep_routing(first) == first
    catch_up = SetRouting(1, "v1", "every wafer", None, 0, 5, 0, measure="margin")
    assert store.keep_routing(catch_up) == first
    assert store.routing(1, "v1") == first
    # The next model version routes the set anew.
    second = SetRouting(1, "v2", "p1 - p2 < 0.8", 0.9, 20, 547, 0, measure="margin")
    assert store.keep_routing(second) == second
    assert store.routing(1, "v2") == second and store.routing(1, "v1") is None
    # A pass that routed no wafer (every picture unreadable) decided nothing: the next does.
    nothing = SetRouting(3, "v1", "", None, 0, 0, 4, measure="margin")
    assert store.keep_routing(nothing) == nothing
    later = SetRouting(3, "v1", "p1 - p2 < 0.9", 0.9, 1, 3, 0, measure="margin")
    assert store.keep_routing(later) == later == store.routing(3, "v1")
    # A routing kept before the measure was recorded still reads.
    (store.set_dir(2)).mkdir()
    (store.set_dir(2) / "routing.json").write_text(
        '{"set_number": 2, "model_version": "v1", "rule": "every wafer", "cut": null,'
        ' "auto": 0, "engineer": 3, "unreadable": 0}'
    )
    assert store.routing(2, "v1") == SetRouting(2, "v1", "every wafer", None, 0, 3, 0)


def test_a_routing_or_chunk_that_is_not_a_regular_file_is_skipped(tmp_path: Path) -> None:
    store = WaferStore(tmp_path)
    store.add(1, [5, 6], "wm811k", wafers(2))
    store.set_dir(1).joinpath("routing.json").mkdir()
    os.mkfifo(store.set_dir(1) / "7-8.npz")
    assert store.routing(1, "v1") is None  # an error logged, nothing blocks
    assert [p.name for p in store.chunk_files(1)] == ["5-6.npz"]
    assert store.read_set(1, CLASSES).task_ids.tolist() == [5, 6]


def test_task_codes_take_only_tasks_whose_data_matches_their_entry(tmp_path: Path) -> None:
    from backend.encoding import resize_nearest

    store = WaferStore(tmp_path)
    stored = wafers(3)  # wafer ids 100, 101, 102
    store.add(2, [7, 8, 9], "LSWMD", stored)

    def task(task_id: int, wafer: int, source: str = "LSWMD", number: int = 2) -> dict:
        return {"id": task_id, "data": {"set": number, "source": source, "wafer_id": wafer}}

    codes = store.task_codes(
        [
            task(7, 100),
            task(8, 999),  # another wafer than stored: its picture decides
            task(9, 102, source="fab"),  # another source: likewise
            task(5, 100),  # not stored
            {"id": 9, "data": "not a mapping"},
        ],
        16,
        CLASSES,
    )
    assert sorted(codes) == [7]
    np.testing.assert_array_equal(codes[7], resize_nearest(stored.die_map(0), 16))
    assert store.task_codes([], 16, CLASSES) == {}


def test_the_import_asks_the_store_only_when_it_knows_every_task(tmp_path: Path) -> None:
    from typing import Any, cast

    from backend.labelstudio import LabelStudioClient
    from backend.wafer_sets import _stored_wafers

    class Counting:
        def __init__(self, total: int) -> None:
            self.total = total

        def count_tasks(self, project: int, filters: Any) -> int:
            return self.total

    store = WaferStore(tmp_path)
    store.add(0, [1, 2, 3], "LSWMD", wafers(3))  # wafer ids 100..102
    store.add(1, [4, 5], "fab", wafers(2, first_row=100))
    assert store.wafer_index()[4] == ("fab", 100, 1)
    same = cast(LabelStudioClient, Counting(5))
    assert _stored_wafers(same, 1, "LSWMD", store) == {100: 0, 101: 0, 102: 0}
    assert _stored_wafers(same, 1, "fab", store) == {100: 1, 101: 1}
    # Label Studio holds a task the store does not know (or lost one): ask Label Studio.
    assert _stored_wafers(cast(LabelStudioClient, Counting(6)), 1, "LSWMD", store) is None
    assert _stored_wafers(cast(LabelStudioClient, Counting(4)), 1, "LSWMD", store) is None
    assert _stored_wafers(same, 1, "LSWMD", None) is None


def test_set_task_ids_map_wafer_ids_to_tasks_of_one_set(tmp_path: Path) -> None:
    store = WaferStore(tmp_path)
    store.add(0, [1, 2, 3], "LSWMD", wafers(3))  # wafer ids 100..102
    store.add(1, [4, 5], "LSWMD", wafers(2, first_row=200))
    assert store.set_task_ids(0) == {100: 1, 101: 2, 102: 3}
    assert store.set_task_ids(1) == {200: 4, 201: 5}
    assert store.set_task_ids(2) == {}
