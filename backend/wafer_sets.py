"""Wafer sets as Label Studio tasks: plan the sets, draw the annotator pictures, import them.

Layer L2. A wafer becomes one task whose data holds the picture an engineer looks at (a PNG
`data:` URL drawn by `backend.encoding.render_picture`, which decodes back to exactly the model's
input) and the fields the Data Manager shows: ``set``, ``source`` (which file the wafer came
from, e.g. ``LSWMD``), ``wafer_id`` (the row in that file), ``lot`` and ``wafer_index``. A wafer
is identified by (``source``, ``wafer_id``). Set 0 is the initial labelled set and is imported
WITH its known failure types as annotations; sets 1..N are imported unlabelled, in order, for the
loop.

Two ways in:
- `plan_sets` + `import_sets`: the simulation. Labelled wafers carved into set 0 and sets 1..N
  whose true failure types go to a CSV (`write_truth`), never into Label Studio.
- `cut_into_sets` + `import_wafers`: the fab's way. New wafers (no known failure type) are
  appended as the next sets after the project's highest one, cut by count or by lot without
  ever splitting a lot; a labelled history goes in as set 0. Wafers already in the project are
  skipped, so an interrupted import is finished by running it again.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from backend.encoding import render_picture
from backend.files import atomic_text_writer, atomic_write_bytes
from backend.images import data_url, png_bytes
from backend.label_config import LabelConfig
from backend.labelstudio import (
    IMPORT_CHUNK,
    FilterOperator,
    LabelStudioClient,
    TaskFilter,
    set_filter,
)
from backend.splits import SetOrder, StudySplit, stratified_sample, study_split
from backend.wafer_store import WaferStore
from backend.wafers import WaferMaps

#: `data.set` of the initial labelled set.
INITIAL_SET = 0
#: `data.source` of WM-811K wafers: the stem of LSWMD.zip and LSWMD.pkl alike.
WM811K_SOURCE = "LSWMD"
_SOURCE_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
#: Columns of the truth CSV.
TRUTH_COLUMNS = ("wafer_id", "set", "failure_type")


@dataclass(frozen=True)
class SetPlan:
    """Which wafers (indices into `wafers`) form the initial set and each numbered set."""

    wafers: WaferMaps
    split: StudySplit

    def members(self, set_number: int) -> np.ndarray[Any, np.dtype[np.intp]]:
        if set_number == INITIAL_SET:
            return self.split.initial
        if not 1 <= set_number <= len(self.split.sets):
            raise ValueError(f"there is no set {set_number} (sets 1..{len(self.split.sets)})")
        return self.split.sets[set_number - 1]

    @property
    def set_numbers(self) -> list[int]:
        return [INITIAL_SET, *range(1, len(self.split.sets) + 1)]


def plan_sets(
    wafers: WaferMaps,
    *,
    subsample: float,
    initial_fraction: float,
    n_sets: int,
    seed: int,
    order: SetOrder = SetOrder.RANDOM,
) -> SetPlan:
    """The labelled wafers, stratified-subsampled, cut into an initial set and `n_sets` sets.

    The same arguments give the same sets (the split of `backend.splits.study_split`).
    """
    labelled = np.flatnonzero(wafers.labels >= 0)
    if labelled.size == 0:
        raise ValueError("the wafer file holds no labelled wafers to build sets from")
    rng = np.random.default_rng(seed)
    chosen = labelled[stratified_sample(wafers.labels[labelled], subsample, rng)]
    picked = wafers.subset(np.sort(chosen))
    split = study_split(picked.labels, initial_fraction, n_sets, order, rng)
    return SetPlan(wafers=picked, split=split)


def choice_result(labels: LabelConfig, failure_type: str) -> list[dict[str, Any]]:
    """An annotation/prediction `result` choosing `failure_type` in the labeling config."""
    if failure_type not in labels.failure_types:
        raise ValueError(
            f"failure type {failure_type!r} is not a choice of the labeling config "
            f"({', '.join(labels.failure_types)})"
        )
    return [
        {
            "from_name": labels.from_name,
            "to_name": labels.to_name,
            "type": "choices",
            "value": {"choices": [failure_type]},
        }
    ]


@dataclass(frozen=True)
class PictureFiles:
    """Wafer pictures as PNG files under `folder`, served by Label Studio's local-files storage
    (`LabelStudioClient.connect_local_files`), instead of data URLs inside the task.

    `folder` must lie under `document_root` (Label Studio's LOCAL_FILES_DOCUMENT_ROOT). A file
    is `<folder>/<source>/<wafer id>.png`, written atomically; the task holds
    `/data/local-files/?d=<path below document_root>`.
    """

    folder: Path
    document_root: Path

    def __post_init__(self) -> None:
        folder, root = self.folder.resolve(), self.document_root.resolve()
        if not folder.is_relative_to(root):
            raise ValueError(
                f"--pictures {self.folder} is not under Label Studio's LOCAL_FILES_DOCUMENT_ROOT "
                f"{self.document_root}: Label Studio could not serve the files"
            )
        object.__setattr__(self, "folder", folder)
        object.__setattr__(self, "document_root", root)

    def value(self, source: str, wafer_id: int, png: bytes) -> str:
        """Write the picture and return the task's image value."""
        path = self.folder / source / f"{int(wafer_id)}.png"
        atomic_write_bytes(path, png)
        return "/data/local-files/?d=" + quote(str(path.relative_to(self.document_root)))


def wafer_task(
    wafers: WaferMaps,
    i: int,
    set_number: int,
    labels: LabelConfig,
    *,
    with_label: bool,
    source: str = WM811K_SOURCE,
    pictures: PictureFiles | None = None,
) -> dict[str, Any]:
    """The Label Studio task of wafer `i`; with its known failure type as an annotation when
    `with_label` (the initial set). `source` names the file the wafer came from. The picture
    is a data URL in the task, or a file under `pictures`."""
    png = png_bytes(render_picture(wafers.die_map(i)))
    wafer_id = int(wafers.source_row[i])
    data = {
        labels.image_value: data_url(png)
        if pictures is None
        else pictures.value(source, wafer_id, png),
        "set": int(set_number),
        "source": source,
        "wafer_id": wafer_id,
        "lot": str(wafers.lots[i]),
        "wafer_index": int(wafers.wafer_index[i]),
    }
    if not with_label:
        return {"data": data}
    code = int(wafers.labels[i])
    if code < 0:
        raise ValueError(f"wafer {int(wafers.source_row[i])} has no known failure type")
    return {
        "data": data,
        "annotations": [{"result": choice_result(labels, wafers.classes[code])}],
    }


def import_sets(
    client: LabelStudioClient,
    project: int,
    plan: SetPlan,
    labels: LabelConfig,
    set_numbers: Sequence[int] | None = None,
    *,
    report: Callable[[str], None] = lambda _: None,
    source: str = WM811K_SOURCE,
    store: WaferStore | None = None,
    chunk_size: int = IMPORT_CHUNK,
    pictures: PictureFiles | None = None,
) -> dict[int, list[int]]:
    """Import the given sets (all by default, in order) and return their task ids per set.

    The initial set comes with its known labels. Each import request fires one TASKS_CREATED
    webhook, which is how a running backend learns about the new set. No check for wafers
    already in the project: this is the simulation's import into a new project
    (`import_wafers` is the one that skips what is there). With `store`, each imported chunk's
    die maps are kept there by task id (the fast way for pre-annotation and retraining).
    """
    imported: dict[int, list[int]] = {}
    for number in plan.set_numbers if set_numbers is None else set_numbers:
        members = plan.members(number)
        ids: list[int] = []
        for start in range(0, len(members), chunk_size):
            chunk = members[start : start + chunk_size]
            tasks = [
                wafer_task(
                    plan.wafers,
                    int(i),
                    number,
                    labels,
                    with_label=number == INITIAL_SET,
                    source=source,
                    pictures=pictures,
                )
                for i in chunk
            ]
            got = client.import_tasks(project, tasks, chunk_size=chunk_size)
            if store is not None:
                store.add(number, got, source, plan.wafers.subset(chunk))
            ids += got
        imported[number] = ids
        what = "initial set (with known labels)" if number == INITIAL_SET else f"set {number}"
        report(f"imported {what}: {len(ids)} wafers")
    return imported


def write_truth(path: Path, plan: SetPlan) -> Path:
    """The true failure type of every planned wafer, for simulations: wafer_id, set, type."""
    with atomic_text_writer(path, newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(TRUTH_COLUMNS)
        for number in plan.set_numbers:
            for i in plan.members(number):
                code = int(plan.wafers.labels[i])
                writer.writerow([int(plan.wafers.source_row[i]), number, plan.wafers.classes[code]])
    return path


def read_truth(path: Path) -> dict[int, str]:
    """wafer_id -> true failure type, from a CSV written by `write_truth`."""
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or set(TRUTH_COLUMNS) - set(reader.fieldnames):
            raise ValueError(f"{path} is not a truth file with columns {', '.join(TRUTH_COLUMNS)}")
        return {int(row["wafer_id"]): row["failure_type"] for row in reader}


# ---- new wafers as the next sets ------------------------------------------------------------


def source_name(path: Path, given: str | None = None) -> str:
    """The `data.source` of the wafers read from `path`: `given`, else the file's stem
    (``LSWMD`` for LSWMD.zip and LSWMD.pkl alike, so both name the same wafers)."""
    name = Path(path).stem if given is None else given
    if not _SOURCE_PATTERN.match(name):
        raise ValueError(
            f"source name {name!r}: use 1-100 letters, digits, '.', '_' or '-', starting with "
            "a letter or digit"
        )
    return name


def lot_groups(lots: npt.NDArray[np.str_]) -> list[npt.NDArray[np.intp]]:
    """Wafer indices grouped by lot: lots in the order they first appear, each lot's wafers in
    file order. A wafer whose lot is unknown ('') is a lot of its own."""
    n = int(lots.shape[0])
    if n == 0:
        return []
    _, first, inverse = np.unique(lots, return_index=True, return_inverse=True)
    key = np.where(lots == "", np.arange(n), first[inverse.reshape(-1)])
    order = np.argsort(key, kind="stable")
    cuts = np.flatnonzero(np.diff(key[order])) + 1
    return [part.astype(np.intp) for part in np.split(order, cuts)]


def cut_into_sets(
    lots: npt.NDArray[np.str_], *, per_set: int | None = None, lots_per_set: int | None = None
) -> list[npt.NDArray[np.intp]]:
    """Wafer indices of each new set, in order; a lot is never split across two sets.

    Exactly one of `per_set` (whole lots are added to a set while it stays within `per_set`
    wafers; a single lot larger than that is a set of its own) and `lots_per_set` (that many
    lots a set; the last set may hold fewer) must be given. Lots come in the order they first
    appear in the file (`lot_groups`).
    """
    if (per_set is None) == (lots_per_set is None):
        raise ValueError("cut the wafers either by count (per_set) or by lot (lots_per_set)")
    limit = per_set if per_set is not None else lots_per_set
    if limit is None or isinstance(limit, bool) or limit < 1:
        raise ValueError(f"wafers or lots a set must be a positive number, got {limit!r}")
    sets: list[list[npt.NDArray[np.intp]]] = []
    size = 0
    for lot in lot_groups(lots):
        if per_set is not None:
            full = size + len(lot) > per_set
        else:
            full = bool(sets) and len(sets[-1]) >= limit
        if not sets or full:
            sets.append([])
            size = 0
        sets[-1].append(lot)
        size += len(lot)
    return [np.concatenate(parts) for parts in sets]


def wafer_filters(source: str, first_id: int, last_id: int) -> list[TaskFilter]:
    """Tasks of `source` whose `wafer_id` lies within first_id..last_id (both included)."""
    return [
        TaskFilter("data.source", FilterOperator.EQUAL, "String", source),
        TaskFilter("data.wafer_id", FilterOperator.IN, "Number", {"min": first_id, "max": last_id}),
    ]


def existing_wafers(
    client: LabelStudioClient, project: int, source: str, wafer_ids: Sequence[int]
) -> dict[int, int]:
    """wafer_id -> set number of those of `wafer_ids` that the project holds from `source`.

    One count of the tasks of `source` within the ids' range (a single small request); only
    when that finds some are their data listed (the range's tasks, pictures included) and
    matched exactly. So checking a chunk of new wafers costs one request; a chunk imported
    before costs a listing of about its own size. Measured on Label Studio 1.23.2 on
    PostgreSQL (2 busy cores): 0.59 s for a new chunk, 13.9 s for 500 wafers already there.
    """
    if not wafer_ids:
        return {}
    filters = wafer_filters(source, min(wafer_ids), max(wafer_ids))
    if client.count_tasks(project, filters) == 0:
        return {}
    wanted = set(wafer_ids)
    found: dict[int, int] = {}
    for _, data in client.task_data(project, filters, ("wafer_id", "set", "source")):
        wafer, number = data.get("wafer_id"), data.get("set")
        if data.get("source") == source and isinstance(wafer, int) and wafer in wanted:
            found[wafer] = int(number) if isinstance(number, int) else -1
    return found


def _stored_wafers(
    client: LabelStudioClient, project: int, source: str, store: WaferStore | None
) -> dict[int, int] | None:
    """wafer_id -> set of the project's wafers from `source`, from the wafer store, when the
    store holds exactly the project's tasks (one count query); None when Label Studio must be
    asked (no store, or a task the store does not know, or one it knows that is gone)."""
    if store is None:
        return None
    index = store.wafer_index()
    if len(index) != client.count_tasks(project, []):
        return None
    return {wafer: number for s, wafer, number in index.values() if s == source}


def highest_set(client: LabelStudioClient, project: int) -> int | None:
    """The project's highest set number (sets are 0, 1, 2, ... without gaps), None when it
    holds no set yet. One small request a set."""
    number = INITIAL_SET
    while client.first_task(project, [set_filter(number)]) is not None:
        number += 1
    return None if number == INITIAL_SET else number - 1


@dataclass
class ImportOutcome:
    """What `import_wafers` did: wafers imported per set number, and wafers skipped because
    the project held them already (same source and wafer id)."""

    source: str
    imported: dict[int, int] = field(default_factory=dict)
    skipped: int = 0

    @property
    def total(self) -> int:
        return sum(self.imported.values())

    def summary(self) -> str:
        sets = ", ".join(f"set {n}: {count:,}" for n, count in sorted(self.imported.items()))
        return (
            f"imported {self.total:,} wafers of {self.source} ({sets or 'none'}); "
            f"skipped {self.skipped:,} already in the project"
        )


def import_wafers(
    client: LabelStudioClient,
    project: int,
    wafers: WaferMaps,
    labels: LabelConfig,
    sets: Sequence[npt.NDArray[np.intp]],
    *,
    source: str,
    initial: bool = False,
    chunk_size: int = IMPORT_CHUNK,
    progress: bool = True,
    after_chunk: Callable[[int, int], None] | None = None,
    store: WaferStore | None = None,
    pictures: PictureFiles | None = None,
) -> ImportOutcome:
    """Import `sets` (wafer indices, e.g. from `cut_into_sets`) into the project, chunk by chunk.

    New wafers (`initial` False) go in WITHOUT any label, the first set after the project's
    highest set (which must exist: import the labelled history first), the next one after it,
    and so on. With `initial`, every wafer must have a known failure type and all of them go
    into set 0 with it as an annotation (the labelled history).

    Before each chunk is imported its wafer ids are checked against the project
    (`existing_wafers`): wafers already there are skipped and counted, never duplicated. So an
    interrupted import is finished by calling again with the same arguments: a set it had begun
    is continued when it is still the highest set. `after_chunk(set_number, wafers)` is called
    after each imported chunk. Each chunk fires one TASKS_CREATED webhook. With `store`, each
    imported chunk's die maps are kept there by task id (pre-annotation and retraining then
    need no picture from Label Studio).

    With `store` holding an entry for every task of the project, wafers already there are found
    in the store (no Label Studio query a chunk). Speed (Label Studio 1.23.2 on PostgreSQL, 2
    busy cores, palette pictures): a labelled history 217 wafers/s (Label Studio storing the
    annotations), new wafers about 1,000 wafers/s.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    members = np.concatenate([np.zeros(0, np.intp), *sets])
    rows = wafers.source_row[members]
    if np.unique(rows).size != rows.size:
        raise ValueError(f"wafer ids of {source} repeat in the input: each wafer must come once")
    if initial and (wafers.labels[members] < 0).any():
        first = int(rows[np.flatnonzero(wafers.labels[members] < 0)[0]])
        raise ValueError(f"wafer {first} of {source} has no known failure type for set 0")
    highest = highest_set(client, project)
    if not initial and highest is None:
        raise ValueError(
            f"project {project} holds no set yet: import the labelled history as set "
            f"{INITIAL_SET} first"
        )
    outcome = ImportOutcome(source)
    # The wafer store answers "already in the project?" without asking Label Studio when it
    # holds an entry for every task of the project (same count); else Label Studio is asked
    # chunk by chunk (tasks imported without the store, or a chunk whose entry a crash lost).
    known = _stored_wafers(client, project, source, store)
    bar = tqdm(total=int(members.size), unit="wafer", desc="importing", disable=not progress)
    try:
        for one_set in sets:
            target = INITIAL_SET if initial else None
            seen: set[int] = set()
            for start in range(0, len(one_set), chunk_size):
                chunk = one_set[start : start + chunk_size]
                ids = [int(w) for w in wafers.source_row[chunk]]
                there = (
                    existing_wafers(client, project, source, ids)
                    if known is None
                    else {w: known[w] for w in ids if w in known}
                )
                seen |= set(there.values())
                new = [int(i) for i, w in zip(chunk, ids, strict=True) if w not in there]
                outcome.skipped += len(chunk) - len(new)
                if new:
                    if target is None:
                        last = INITIAL_SET if highest is None else highest
                        resumed = seen == {last} and last != INITIAL_SET
                        target = last if resumed else last + 1
                    highest = target if highest is None else max(highest, target)
                    tasks = [
                        wafer_task(
                            wafers,
                            i,
                            target,
                            labels,
                            with_label=initial,
                            source=source,
                            pictures=pictures,
                        )
                        for i in new
                    ]
                    got = client.import_tasks(project, tasks, chunk_size=chunk_size)
                    if store is not None:
                        store.add(target, got, source, wafers.subset(np.asarray(new)))
                    if known is not None:
                        known.update((int(wafers.source_row[i]), target) for i in new)
                    outcome.imported[target] = outcome.imported.get(target, 0) + len(new)
                    if after_chunk is not None:
                        after_chunk(target, len(new))
                bar.update(len(chunk))
    finally:
        bar.close()
    return outcome
