"""Reading the labelled wafers for a retraining: in full, then as the changes since the last
read (`backend.label_reads`, `backend.label_snapshot`), against a real Label Studio 1.23.2.

Each read is checked against what a full export gives at that moment: the changes path must
end with the very same labels, whatever happened in between (bulk auto labels of a new set, an
engineer's edit of an earlier set, a deleted annotation, a copy that lost tasks or is garbage).
"""

from __future__ import annotations

import gzip
import logging
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import backend.label_reads as label_reads
import backend.labelstudio as labelstudio
from backend.label_config import DEFAULT_LABEL_CONFIG, LabelConfig
from backend.label_reads import read_labelled_tasks
from backend.label_snapshot import (
    LabelledSnapshot,
    load_snapshot,
    save_snapshot,
    snapshot_path,
)
from backend.labelstudio import LabelStudioClient
from backend.wafer_sets import choice_result
from backend.wafer_store import WaferStore
from backend.wafers import WaferMaps

#: The wafer set of each task of the test project: the history (0), then sets 1 and 2.
SETS = (0, 0, 0, 1, 1, 1, 2, 2)


def labels_by_task(tasks: list[dict[str, Any]]) -> dict[int, list[tuple[Any, ...]]]:
    """What the loop reads of each task's annotations, comparable across both read paths."""
    return {
        int(t["id"]): sorted(
            (
                a["id"],
                a.get("completed_by"),
                a.get("updated_by"),
                bool(a.get("was_cancelled")),
                a.get("parent_prediction"),
                str(a.get("result")),
            )
            for a in t.get("annotations") or []
        )
        for t in tasks
    }


def die_maps(n: int, classes: tuple[str, ...]) -> WaferMaps:
    rng = np.random.default_rng(n)
    return WaferMaps.from_maps(
        [rng.integers(0, 3, size=(5, 5)) for _ in range(n)],
        [""] * n,
        classes,
        lots=["lot"] * n,
        wafer_index=list(range(1, n + 1)),
        source_row=list(range(n)),
    )


@pytest.fixture(autouse=True)
def no_overlap(monkeypatch: pytest.MonkeyPatch) -> None:
    """What is asked for again is only what changed (one machine, one clock), so the tests see
    which path a read took and what it asked for."""
    monkeypatch.setattr(label_reads, "OVERLAP", timedelta(0))


@pytest.fixture
def wafer_project(
    ls: LabelStudioClient, label_config: LabelConfig, tmp_path: Path
) -> tuple[int, list[int], WaferStore]:
    """A project with the tasks of `SETS` (pictures as tiny data URIs), all in a wafer store."""
    pid = ls.create_project(f"label reads {uuid.uuid4().hex[:8]}", DEFAULT_LABEL_CONFIG.read_text())
    data = [
        {"image": f"data:image/png;base64,{i:04d}", "set": s, "source": "t", "wafer_id": i}
        for i, s in enumerate(SETS)
    ]
    ids = ls.import_tasks(pid, data)
    store = WaferStore.for_project(tmp_path, pid)
    for number in sorted(set(SETS)):
        members = [t for t, s in zip(ids, SETS, strict=True) if s == number]
        store.add(number, members, "t", die_maps(len(members), label_config.failure_types))
    return pid, ids, store


def read(
    ls: LabelStudioClient, store: WaferStore, model_dir: Path, project: int, set_number: int
) -> label_reads.LabelRead:
    return read_labelled_tasks(ls, store, model_dir, project, set_number, "image")


@pytest.mark.e2e
def test_changes_since_the_last_read_give_what_a_full_export_gives(
    ls: LabelStudioClient,
    label_config: LabelConfig,
    wafer_project: tuple[int, list[int], WaferStore],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    project, ids, store = wafer_project
    history, set_one, set_two = ids[:3], ids[3:6], ids[6:]
    monkeypatch.setattr(labelstudio, "EXPORT_IDS_CHUNK", 2)  # several requests per read

    # The history's known labels; the first read has no copy: the whole export.
    for task in history:
        ls.accept_prediction(task, project, choice_result(label_config, "Center"), None)
    first = read(ls, store, tmp_path, project, 0)
    assert first.how == "full" and first.asked == 0
    assert labels_by_task(first.tasks) == labels_by_task(ls.labelled_tasks(project))
    assert sorted(labels_by_task(first.tasks)) == history
    copy = load_snapshot(snapshot_path(tmp_path, project), project)
    assert copy is not None and copy.through_set == 0
    # The die maps are in the wafer store: the pictures are not copied.
    assert all("image" not in t["data"] and t["data"]["set"] == 0 for t in copy.tasks)

    # Set 1 is auto-labelled in bulk (leaves `updated_at` alone) and an engineer changes one
    # label of the history.
    ls.create_predictions(
        project,
        [
            {"task": t, "result": choice_result(label_config, "Donut"), "model_version": "v1"}
            for t in set_one
        ],
    )
    ls.accept_predictions(project, set_one, "v1")
    [edited] = [a["id"] for a in ls.task(history[1])["annotations"]]
    ls.update_annotation(edited, choice_result(label_config, "Scratch"))
    second = read(ls, store, tmp_path, project, 1)
    assert second.how == "changes"
    # set 1 and the edited task; not set 2, which is not open yet
    assert second.asked == len(set_one) + 1
    full = ls.labelled_tasks(project)
    assert labels_by_task(second.tasks) == labels_by_task(full)
    assert sorted(labels_by_task(second.tasks)) == history + set_one
    scratch = next(t for t in second.tasks if t["id"] == history[1])
    assert "Scratch" in str(scratch["annotations"][0]["result"])

    # A deleted auto label of set 1 (an earlier set by now) is seen through `updated_at`; an
    # engineer skips a wafer of set 2 (a cancelled annotation: exported, and counted).
    [gone] = [a["id"] for a in ls.task(set_one[0])["annotations"]]
    ls.delete_annotations([gone])
    ls._sdk.annotations.create(id=set_two[0], project=project, result=[], was_cancelled=True)
    third = read(ls, store, tmp_path, project, 2)
    assert third.how == "changes"
    assert sorted(labels_by_task(third.tasks)) == history + set_one[1:] + set_two[:1]
    assert labels_by_task(third.tasks) == labels_by_task(ls.labelled_tasks(project))

    # Nothing changed since: nothing is asked, and the copy alone is what Label Studio holds.
    fourth = read(ls, store, tmp_path, project, 2)
    assert (fourth.how, fourth.asked) == ("changes", 0)
    assert labels_by_task(fourth.tasks) == labels_by_task(third.tasks)


@pytest.mark.e2e
def test_a_read_ahead_of_the_open_set_leaves_its_retraining_only_the_engineers_labels(
    ls: LabelStudioClient,
    label_config: LabelConfig,
    wafer_project: tuple[int, list[int], WaferStore],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`backend.jobs.read_ahead_job`'s read: through the open set once its auto labels are made,
    so that the retraining after its last label asks only for what engineers labelled since."""
    project, ids, store = wafer_project
    history, set_one = ids[:3], ids[3:6]
    for task in history:
        ls.accept_prediction(task, project, choice_result(label_config, "Center"), None)
    read(ls, store, tmp_path, project, 0)
    # Set 1 opens: two confident wafers auto-labelled in bulk, one left to engineers.
    ls.create_predictions(
        project,
        [
            {"task": t, "result": choice_result(label_config, "Donut"), "model_version": "v1"}
            for t in set_one[:2]
        ],
    )
    accepting = datetime.now(UTC)
    ls.accept_predictions(project, set_one[:2], "v1")
    # Label Studio's bulk accept marks the tasks changed (`updated_at`) like any label.
    changed = ls.task_updates(project, [labelstudio.updated_since_filter(accepting)])
    assert set(set_one[:2]) <= {t.task for t in changed}
    ahead = read(ls, store, tmp_path, project, 1)
    # the open set's tasks are asked for once, here, while its engineers work
    assert (ahead.how, ahead.asked) == ("changes", len(set_one))
    copy = load_snapshot(snapshot_path(tmp_path, project), project)
    assert copy is not None and copy.through_set == 1

    ls.accept_prediction(set_one[2], project, choice_result(label_config, "Loc"), None)
    # Every task changed within the window (an hour: the whole project, the bulk accept of set
    # 1 included), but only the one an engineer labelled since the read ahead differs from the
    # copy: that one alone is asked for.
    monkeypatch.setattr(label_reads, "OVERLAP", timedelta(hours=1))
    window = copy.read_at - timedelta(hours=1)
    recent = ls.task_updates(project, [labelstudio.updated_since_filter(window)])
    assert {t.task for t in recent} == set(ids)
    retraining = read(ls, store, tmp_path, project, 1)
    assert (retraining.how, retraining.asked) == ("changes", 1)
    assert labels_by_task(retraining.tasks) == labels_by_task(ls.labelled_tasks(project))
    assert sorted(labels_by_task(retraining.tasks)) == history + set_one


@pytest.mark.e2e
def test_a_copy_that_disagrees_with_label_studio_is_replaced_by_a_full_read(
    ls: LabelStudioClient,
    label_config: LabelConfig,
    wafer_project: tuple[int, list[int], WaferStore],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    project, ids, store = wafer_project
    for task in ids[:3]:
        ls.accept_prediction(task, project, choice_result(label_config, "Loc"), None)
    read(ls, store, tmp_path, project, 0)
    path = snapshot_path(tmp_path, project)
    copy = load_snapshot(path, project)
    assert copy is not None
    # A copy that lost a task (it cannot be caught by `updated_at`): counts differ -> full.
    short = LabelledSnapshot(project, copy.through_set, copy.read_at, list(copy.tasks)[1:])
    save_snapshot(path, short, "image", set())
    with caplog.at_level(logging.WARNING):
        again = read(ls, store, tmp_path, project, 0)
    assert again.how == "full" and "reading them all" in caplog.text
    assert sorted(labels_by_task(again.tasks)) == ids[:3]

    # A damaged copy is reported and ignored, never trusted in part.
    path.write_bytes(gzip.compress(b'{"format": "something else"}'))
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert load_snapshot(path, project) is None
    assert "ignored" in caplog.text
    assert read(ls, store, tmp_path, project, 0).how == "full"
    path.write_bytes(b"not gzip")
    assert read(ls, store, tmp_path, project, 0).how == "full"
    # ... and another project's copy is not this one's.
    assert load_snapshot(path, project + 1) is None


def test_a_copy_keeps_the_picture_only_where_the_wafer_store_has_no_die_map(
    tmp_path: Path,
) -> None:
    from datetime import UTC, datetime

    tasks = [
        {
            "id": i,
            "data": {"image": f"png{i}", "set": 1},
            "annotations": [{"id": 10 + i, "completed_by": 3, "result": [], "lead_time": 2.0}],
            "drafts": [],
        }
        for i in (1, 2)
    ]
    path = tmp_path / "copy.json.gz"
    when = datetime(2026, 12, 4, 12, tzinfo=UTC)
    save_snapshot(path, LabelledSnapshot(7, 1, when, tasks), "image", {1})
    copy = load_snapshot(path, 7)
    assert copy is not None and copy.read_at == when and copy.through_set == 1
    by_id = {t["id"]: t for t in copy.tasks}
    assert "image" not in by_id[1]["data"] and by_id[2]["data"]["image"] == "png2"
    assert "lead_time" not in by_id[1]["annotations"][0] and "drafts" not in by_id[1]
    assert by_id[2]["annotations"][0]["completed_by"] == 3
    assert not list(tmp_path.glob(".copy*"))  # written whole, no temporary file left
