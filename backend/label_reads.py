"""Every labelled wafer of a project, for a retraining: read from Label Studio in full the first
time, then as the changes since the last read. Layer L2.

Label Studio's export of all labelled tasks grows with the project (~313 tasks/s on 2 cores;
at 86,000 labelled tasks ~275 s of a 5-minute budget from a set's last label to the next set,
measured in the full-scale run). The last read is kept (`backend.label_snapshot`), and the next
one asks Label Studio only for

- every task of the sets after those read whole up to the one retrained (the set just finished,
  unless a read ahead read it, `backend.jobs.read_ahead_job`), found in the wafer store, and
- every task Label Studio changed since the last read began, less `OVERLAP` (`updated_at`: an
  engineer's label, an edit, a deletion through the API, a bulk accept), unless the copy holds
  it as last changed (the same `updated_at`),

exported by id, and merges them into the copy. Label Studio stays the truth: when the merged
copy's annotations are not as many as Label Studio counts (a label made in bulk on an earlier
set, a lost task), or there is no usable copy, every labelled task is exported as before.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from backend.label_snapshot import (
    LabelledSnapshot,
    load_snapshot,
    save_snapshot,
    snapshot_path,
)
from backend.labelstudio import LabelStudioClient, updated_since_filter, utc_time
from backend.wafer_store import WaferStore

log = logging.getLogger(__name__)

#: Tasks changed this long before the last read began are asked for again: Label Studio's clock
#: may differ from the worker's, and a label saved while the last read ran may have been missed.
OVERLAP = timedelta(minutes=10)


@dataclass(frozen=True)
class LabelRead:
    """The labelled tasks and how they were read: `full` (the whole export) or `changes` (the
    copy plus `asked` tasks exported by id)."""

    tasks: list[dict[str, Any]]
    how: str
    asked: int
    seconds: float

    def summary(self) -> dict[str, Any]:
        return {
            "how": self.how,
            "tasks": len(self.tasks),
            "asked": self.asked,
            "seconds": round(self.seconds, 2),
        }


def read_labelled_tasks(
    client: LabelStudioClient,
    wafers: WaferStore,
    model_dir: Path,
    project: int,
    set_number: int,
    picture_key: str,
) -> LabelRead:
    """Every labelled task of `project`, as `LabelStudioClient.labelled_tasks` gives them, for
    the retraining of `set_number`; the copy is rewritten for the next read. `picture_key` is
    the data key of the task's picture (left out of the copy where the wafer store holds the
    die map)."""
    started_at, started = datetime.now(UTC), time.perf_counter()
    path = snapshot_path(model_dir, project)
    index = wafers.wafer_index()
    snapshot = load_snapshot(path, project)
    tasks: list[dict[str, Any]] | None = None
    how, asked = "full", 0
    if snapshot is not None:
        recent = client.task_updates(project, [updated_since_filter(snapshot.read_at - OVERLAP)])
        # Of the tasks changed within the window, those the copy holds as Label Studio last
        # changed them (the same `updated_at`, whatever the clocks) are not asked again: the
        # open set's auto labels, made just before a read ahead (`backend.jobs`), would
        # otherwise be exported once more by the retraining after its last label. Nor are the
        # tasks outside the copy without an annotation (a set just opened: its predictions);
        # should Label Studio's counters miss one, the count check below reads everything.
        kept_at = {int(t["id"]): utc_time(t.get("updated_at")) for t in snapshot.tasks}
        changed = {
            t.task
            for t in recent
            if (t.task in kept_at and (t.updated_at is None or kept_at[t.task] != t.updated_at))
            or (t.task not in kept_at and t.annotations > 0)
        }
        # Sets after `set_number` hold no labels yet (a set opens after the retraining of the
        # one before), and asking for their ids costs as much as for labelled ones: 8 unopened
        # sets of 17,295 made a read of 139,438 ids take 259 s in the full-scale run.
        later = [t for t, (_, _, s) in index.items() if snapshot.through_set < s <= set_number]
        ask = changed | set(later)
        merged = {int(t["id"]): t for t in snapshot.tasks if int(t["id"]) not in ask}
        merged.update((int(t["id"]), t) for t in client.labelled_tasks(project, ids=sorted(ask)))
        counted = sum(len(t.get("annotations") or []) for t in merged.values())
        expected = client.annotation_count(project)
        if counted == expected:
            tasks = [merged[i] for i in sorted(merged)]
            how, asked = "changes", len(ask)
        else:
            log.warning(
                "project %d: the labelled-task copy and its changes hold %d annotations, "
                "Label Studio counts %d: reading them all",
                project,
                counted,
                expected,
            )
    if tasks is None:
        tasks = client.labelled_tasks(project)
    save_snapshot(
        path,
        LabelledSnapshot(project, set_number, started_at, tasks),
        picture_key,
        index,
    )
    read = LabelRead(tasks, how, asked, time.perf_counter() - started)
    log.info("project %d: labelled tasks read: %s", project, read.summary())
    return read
