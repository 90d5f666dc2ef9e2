"""Wafer sets as Label Studio tasks: plan the sets, draw the annotator pictures, import them.

Layer L2. A wafer becomes one task whose data holds the picture an engineer looks at (a PNG
`data:` URL drawn by `backend.encoding.render_picture`, which decodes back to exactly the model's
input) and the fields the Data Manager shows: ``set``, ``wafer_id`` (the row in the source file),
``lot`` and ``wafer_index``. Set 0 is the initial labelled set and is imported WITH its known
failure types as annotations; sets 1..N are imported unlabelled, in order, for the loop.

The true failure types of the unlabelled sets never go into Label Studio; `write_truth` keeps
them in a CSV beside the run so a simulation can play the engineers and count errors.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from backend.encoding import render_picture
from backend.images import data_url, png_bytes
from backend.label_config import LabelConfig
from backend.labelstudio import LabelStudioClient
from backend.splits import SetOrder, StudySplit, stratified_sample, study_split
from backend.wafers import WaferMaps

#: `data.set` of the initial labelled set.
INITIAL_SET = 0
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


def wafer_task(
    wafers: WaferMaps, i: int, set_number: int, labels: LabelConfig, *, with_label: bool
) -> dict[str, Any]:
    """The Label Studio task of wafer `i`; with its known failure type as an annotation when
    `with_label` (the initial set)."""
    data = {
        labels.image_value: data_url(png_bytes(render_picture(wafers.die_map(i)))),
        "set": int(set_number),
        "wafer_id": int(wafers.source_row[i]),
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
) -> dict[int, list[int]]:
    """Import the given sets (all by default, in order) and return their task ids per set.

    The initial set comes with its known labels. Each import request fires one TASKS_CREATED
    webhook, which is how a running backend learns about the new set.
    """
    imported: dict[int, list[int]] = {}
    for number in plan.set_numbers if set_numbers is None else set_numbers:
        members = plan.members(number)
        tasks = [
            wafer_task(plan.wafers, int(i), number, labels, with_label=number == INITIAL_SET)
            for i in members
        ]
        imported[number] = client.import_tasks(project, tasks)
        what = "initial set (with known labels)" if number == INITIAL_SET else f"set {number}"
        report(f"imported {what}: {len(tasks)} wafers")
    return imported


def write_truth(path: Path, plan: SetPlan) -> Path:
    """The true failure type of every planned wafer, for simulations: wafer_id, set, type."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
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
