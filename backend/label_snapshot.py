"""The labelled tasks as the last retraining read them, kept beside the project's wafer store.

Layer L1 (files). A retraining needs every labelled wafer of the project, and Label Studio's
export of them grows with the project (~313 tasks/s on 2 cores: ~275 s at 86,000 labelled
tasks, measured in the full-scale run). With this copy the next retraining asks Label Studio only
for what changed since (`backend.label_reads`). Layout:

    MODEL_DIR/projects/<id>/labelled-tasks.json.gz

gzip'd JSON: the project, the sets read whole (`through_set`), when the read began, and each
labelled task as the export gave it, slimmed to what the loop reads (id, when Label Studio last
changed it, data, and per annotation its id, users, cancelled flag, parent prediction and
result). A task's picture is left
out where the wafer store holds its die map. Written atomically; a file that cannot be read is
reported and ignored (the next read is then a full export), never trusted in part.
"""

from __future__ import annotations

import gzip
import json
import logging
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from backend.files import atomic_writer

log = logging.getLogger(__name__)

FORMAT = "wafermap-labelled-tasks/1"
#: What the loop reads of an annotation (`backend.loop_state`).
ANNOTATION_KEYS = (
    "id",
    "completed_by",
    "updated_by",
    "was_cancelled",
    "parent_prediction",
    "result",
)


@dataclass(frozen=True)
class LabelledSnapshot:
    """The labelled tasks of a project as of `read_at` (UTC, when the read began): every set up
    to `through_set` was read whole, later changes are caught by Label Studio's `updated_at`."""

    project: int
    through_set: int
    read_at: datetime
    tasks: Sequence[dict[str, Any]]


def snapshot_path(model_dir: Path, project: int) -> Path:
    """Where the project's copy lives, beside its wafer store."""
    return Path(model_dir) / "projects" / str(project) / "labelled-tasks.json.gz"


def slim_task(task: Mapping[str, Any], picture_key: str | None) -> dict[str, Any]:
    """The task with what the loop reads: its id, `updated_at` (what the next read compares),
    its data (without `picture_key`, when given)
    and its annotations' `ANNOTATION_KEYS`; predictions are not kept (the export has none)."""
    data = dict(task.get("data") or {})
    if picture_key is not None:
        data.pop(picture_key, None)
    return {
        "id": int(task["id"]),
        "updated_at": task.get("updated_at"),
        "data": data,
        "predictions": [],
        "annotations": [
            {key: a.get(key) for key in ANNOTATION_KEYS}
            for a in task.get("annotations") or []
            if isinstance(a, Mapping)
        ],
    }


def save_snapshot(
    path: Path,
    snapshot: LabelledSnapshot,
    picture_key: str,
    stored: Container[int],
) -> None:
    """Write the copy atomically; the picture (`data[picture_key]`) of a task whose die map is in
    the wafer store (`stored`, task ids) is left out."""
    body = {
        "format": FORMAT,
        "project": snapshot.project,
        "through_set": snapshot.through_set,
        "read_at": snapshot.read_at.isoformat(),
        "tasks": [
            slim_task(t, picture_key if int(t["id"]) in stored else None) for t in snapshot.tasks
        ],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(path) as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1) as out:
        out.write(json.dumps(body, separators=(",", ":")).encode())


def load_snapshot(path: Path, project: int) -> LabelledSnapshot | None:
    """The copy at `path`, or None when there is none or it cannot be used (logged: a file
    that is not this format, or of another project)."""
    if not path.exists():
        return None
    try:
        with gzip.open(path, "rb") as raw:
            body = json.loads(raw.read())
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file")
        if body.get("project") != project:
            raise ValueError(f"it is project {body.get('project')}'s, not {project}'s")
        tasks = body["tasks"]
        if not isinstance(tasks, list) or not all(
            isinstance(t, dict) and isinstance(t.get("id"), int) for t in tasks
        ):
            raise ValueError("its task list is malformed")
        read_at = datetime.fromisoformat(str(body["read_at"]))
        if read_at.tzinfo is None:
            raise ValueError("its read time has no time zone")
        return LabelledSnapshot(
            project=project,
            through_set=int(body["through_set"]),
            read_at=read_at,
            tasks=tasks,
        )
    except (OSError, EOFError, ValueError, KeyError, TypeError) as exc:
        log.error("labelled-task copy %s ignored (a full export follows): %s", path, exc)
        return None
