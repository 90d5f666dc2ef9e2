"""The die maps of a project's wafers by Label Studio task id, kept beside its model store.

Layer L1 (files). Written by the import as each chunk of tasks lands in Label Studio, read when a
set is pre-annotated and when the backend retrains, so neither has to list every task's picture
out of Label Studio and decode it back (measured on Label Studio 1.23.2 on PostgreSQL, 2 cores:
listing 17,295 tasks with their pictures took 93 s before one wafer was decoded). Layout:

    MODEL_DIR/projects/<id>/wafers/set-<n>/<first task id>-<last task id>.npz

one compressed file per imported chunk (and `set-<n>/routing.json`, the `SetRouting` the
pre-annotation decided for the set, with its audit sample; `set-<n>/audit.json`, the set's
`backend.audit.SetAudit` once its audit wafers are labelled): the task ids, the wafer's source and wafer id (the row in
that source), lot and slot, and the die maps in the ragged layout of `backend.wafers.WaferMaps`.
Files are written atomically (a temporary file, then a rename) and never changed afterwards.

Label Studio stays the truth about which tasks exist: a reader takes from here only the tasks
Label Studio names (`lookup`), and a task without an entry (imported before this store existed,
or whose chunk was imported when the process died before writing it) is read from its picture
as before. A file that cannot be read is skipped with a logged error, never trusted in part.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from backend.audit import SetAudit
from backend.encoding import encode_wafers
from backend.files import (
    atomic_write_text,
    atomic_writer,
    read_regular_file,
)
from backend.wafers import WaferMaps

log = logging.getLogger(__name__)

_CHUNK_NAME = re.compile(r"^(\d+)-(\d+)\.npz$")
_SET_NAME = re.compile(r"^set-(\d+)$")
_ARRAYS = ("task_ids", "sources", "wafer_ids", "lots", "wafer_index", "flat", "offsets", "shapes")
#: routing.json carries the audit sample's task ids: about 40 bytes a sampled wafer.
_ROUTING_MAX_BYTES = 4 * 1024 * 1024
_AUDIT_MAX_BYTES = 64 * 1024


@dataclass(frozen=True)
class SetRouting:
    """How the pre-annotation routed a set: with which model and rule, and the prediction score
    `cut` at and above which a wafer is auto-labelled (None: every wafer to engineers). Kept
    once per model version (`WaferStore.keep_routing`): an accept step that did not finish is
    finished later with the same cut, and wafers added to the set later (a lost TASKS_CREATED)
    are routed by it too. `measure` is the uncertainty measure the scores are stated in
    (None in routings kept before it was recorded); the counts are those of the first pass.

    `audit` maps the task id of each audit wafer (auto-routed, held back from the accept step
    and labelled blind by engineers, `backend.audit`) to the model's label; `sampled` are the
    engineer-routed wafers of the same random sample. `auto` counts the wafers routed auto and
    accepted (audit wafers not included), `engineer` the rest that were predicted."""

    set_number: int
    model_version: str
    rule: str
    cut: float | None
    auto: int
    engineer: int
    unreadable: int
    measure: str | None = None
    audit: Mapping[int, str] = dataclasses.field(default_factory=dict)
    sampled: tuple[int, ...] = ()

    @property
    def decided(self) -> bool:
        """Whether the pass routed any wafer (one whose every picture was unreadable decided
        no cut, and a later pass of the same version may decide it)."""
        return self.auto + self.engineer > 0

    @property
    def sample(self) -> frozenset[int]:
        """Task ids of the set's random sample (audit wafers and sampled engineer wafers)."""
        return frozenset(self.audit) | frozenset(self.sampled)

    def to_json(self) -> str:
        fields = self.__dict__ | {
            "audit": [[t, label] for t, label in sorted(self.audit.items())],
            "sampled": list(self.sampled),
        }
        return json.dumps(fields, indent=0)

    @classmethod
    def from_json(cls, text: str) -> SetRouting:
        data = json.loads(text)
        cut = data.get("cut")
        audit = {int(t): str(label) for t, label in data.get("audit") or []}
        return cls(
            set_number=int(data["set_number"]),
            model_version=str(data["model_version"]),
            rule=str(data.get("rule", "")),
            cut=None if cut is None else float(cut),
            auto=int(data.get("auto", 0)),
            engineer=int(data.get("engineer", 0)),
            unreadable=int(data.get("unreadable", 0)),
            measure=None if data.get("measure") is None else str(data["measure"]),
            audit=audit,
            sampled=tuple(int(t) for t in data.get("sampled") or []),
        )


@dataclass(frozen=True, eq=False)
class StoredWafers:
    """Wafers read from the store: `task_ids[i]` is the Label Studio task of die map `i` of
    `maps` (whose `source_row` is the wafer id within `sources[i]`; labels are all -1: labels
    live in Label Studio)."""

    task_ids: npt.NDArray[np.int64]
    sources: npt.NDArray[np.str_]
    maps: WaferMaps

    def __len__(self) -> int:
        return int(self.task_ids.shape[0])


def _empty(classes: Sequence[str]) -> StoredWafers:
    maps = WaferMaps.from_maps([], np.zeros(0, np.int16), classes)
    return StoredWafers(np.zeros(0, np.int64), np.zeros(0, np.str_), maps)


@dataclass(frozen=True)
class WaferStore:
    """One project's stored die maps (see the module docstring)."""

    root: Path

    @classmethod
    def for_project(cls, model_dir: Path, project: int) -> WaferStore:
        """MODEL_DIR/projects/<id>/wafers (beside the project's model store)."""
        if isinstance(project, bool) or not isinstance(project, int) or project < 1:
            raise ValueError(f"not a Label Studio project id: {project!r}")
        return cls(Path(model_dir) / "projects" / str(project) / "wafers")

    def set_dir(self, set_number: int) -> Path:
        if set_number < 0:
            raise ValueError(f"set numbers are 0 or more, got {set_number}")
        return self.root / f"set-{set_number}"

    def add(
        self,
        set_number: int,
        task_ids: Sequence[int],
        source: str,
        wafers: WaferMaps,
    ) -> Path:
        """Store the die maps of tasks just imported into set `set_number`: task `task_ids[i]`
        holds wafer `i` of `wafers` (its `source_row` is the wafer id in `source`)."""
        ids = np.asarray(task_ids, dtype=np.int64)
        if ids.ndim != 1 or ids.size != len(wafers):
            raise ValueError(f"{ids.size} task ids for {len(wafers)} wafers")
        if ids.size == 0:
            raise ValueError("no wafers to store")
        folder = self.set_dir(set_number)
        path = folder / f"{int(ids.min())}-{int(ids.max())}.npz"
        with atomic_writer(path) as f:
            np.savez_compressed(
                f,
                task_ids=ids,
                sources=np.full(ids.size, source, dtype=f"<U{max(len(source), 1)}"),
                wafer_ids=wafers.source_row,
                lots=wafers.lots,
                wafer_index=wafers.wafer_index,
                flat=wafers.flat,
                offsets=wafers.offsets,
                shapes=wafers.shapes,
            )
        return path

    def save_routing(self, routing: SetRouting) -> None:
        """Write the set's routing (atomically replacing an earlier one, whatever its model
        version: the loop itself keeps a routing once per version with `keep_routing`)."""
        folder = self.set_dir(routing.set_number)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "routing.json", routing.to_json())

    def save_audit(self, audit: SetAudit) -> None:
        """Write the set's audit (atomically replacing an earlier one)."""
        folder = self.set_dir(audit.set_number)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "audit.json", audit.to_json())

    def audit(self, set_number: int) -> SetAudit | None:
        """The set's audit, or None when there is none (or it is unreadable: logged)."""
        path = self.set_dir(set_number) / "audit.json"
        try:
            return SetAudit.from_json(read_regular_file(path, _AUDIT_MAX_BYTES).decode())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("wafer store: unreadable audit of set %d (%s)", set_number, exc)
            return None

    def audits(self) -> list[SetAudit]:
        """Every set's audit, by set number."""
        return [a for n in self.sets() if (a := self.audit(n)) is not None]

    def routings(self) -> list[SetRouting]:
        """Every set's routing (whatever model version made it), by set number."""
        found = []
        for number in self.sets():
            path = self.set_dir(number) / "routing.json"
            if not path.exists():
                continue
            try:
                text = read_regular_file(path, _ROUTING_MAX_BYTES).decode()
                found.append(SetRouting.from_json(text))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("wafer store: unreadable routing of set %d (%s)", number, exc)
        return found

    def keep_routing(self, routing: SetRouting) -> SetRouting:
        """The set's routing by `routing.model_version`, written once: an existing readable one
        of that version that routed any wafer (`SetRouting.decided`) is returned unchanged (a
        catch-up pre-annotation of wafers added later never rewrites the set's cut or counts);
        otherwise `routing` is written and returned. Callers hold the project lock, so no two
        writers race here."""
        kept = self.routing(routing.set_number, routing.model_version)
        if kept is not None and kept.decided:
            return kept
        self.save_routing(routing)
        return routing

    def routing(self, set_number: int, model_version: str) -> SetRouting | None:
        """The set's routing by `model_version`, or None when there is none (or it is unreadable,
        which includes anything but a regular file: a FIFO there never blocks the loop)."""
        path = self.set_dir(set_number) / "routing.json"
        try:
            found = SetRouting.from_json(read_regular_file(path, _ROUTING_MAX_BYTES).decode())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("wafer store: unreadable routing of set %d (%s)", set_number, exc)
            return None
        return found if found.model_version == model_version else None

    def task_codes(
        self, tasks: Sequence[Mapping[str, Any]], size: int, classes: Sequence[str]
    ) -> dict[int, npt.NDArray[np.uint8]]:
        """Task id -> (size, size) model input of the tasks stored here, for tasks whose data
        names the same source and wafer id as their stored entry (any other task is left to its
        picture). Reads only the chunk files of the tasks' sets that hold them."""
        wanted: dict[int, tuple[str, int]] = {}
        sets: set[int] = set()
        for task in tasks:
            data = task.get("data")
            task_id, number = task.get("id"), None
            if isinstance(data, Mapping):
                number, source, wafer = data.get("set"), data.get("source"), data.get("wafer_id")
                ok = isinstance(source, str) and isinstance(wafer, int) and isinstance(number, int)
                if ok and isinstance(task_id, int) and not isinstance(task_id, bool):
                    wanted[task_id] = (str(source), int(wafer))  # type: ignore[arg-type]
                    sets.add(int(number))  # type: ignore[arg-type]
        if not wanted:
            return {}
        found = self.lookup(sets, wanted, classes)
        codes = encode_wafers(found.maps, size)
        return {
            int(t): codes[row]
            for row, t in enumerate(found.task_ids.tolist())
            if wanted.get(int(t)) == (str(found.sources[row]), int(found.maps.source_row[row]))
        }

    def wafer_index(self) -> dict[int, tuple[str, int, int]]:
        """Task id -> (source, wafer id, set) of every stored wafer, reading only the id arrays
        (no die map is decompressed). Unreadable files are skipped (logged)."""
        found: dict[int, tuple[str, int, int]] = {}
        for number in self.sets():
            for path in self.chunk_files(number):
                try:
                    with np.load(path, allow_pickle=False) as npz:
                        ids, sources, wafers = npz["task_ids"], npz["sources"], npz["wafer_ids"]
                except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
                    log.error("wafer store: skipping unreadable %s (%s)", path, exc)
                    continue
                for t, source, wafer in zip(
                    ids.tolist(), sources.tolist(), wafers.tolist(), strict=True
                ):
                    found[int(t)] = (str(source), int(wafer), number)
        return found

    def set_task_ids(self, set_number: int) -> dict[int, int]:
        """wafer id -> task id of the set's stored wafers (id arrays only, no die map read)."""
        return {
            wafer: task_id
            for task_id, (_, wafer, number) in self.wafer_index().items()
            if number == set_number
        }

    def sets(self) -> list[int]:
        """The set numbers with stored wafers, ascending."""
        if not self.root.is_dir():
            return []
        found = (_SET_NAME.match(p.name) for p in self.root.iterdir() if p.is_dir())
        return sorted(int(m.group(1)) for m in found if m)

    def chunk_files(self, set_number: int) -> list[Path]:
        folder = self.set_dir(set_number)
        if not folder.is_dir():
            return []
        files = [p for p in folder.iterdir() if _CHUNK_NAME.match(p.name) and p.is_file()]
        return sorted(files, key=lambda p: int(_CHUNK_NAME.match(p.name).group(1)))  # type: ignore[union-attr]

    def read_set(self, set_number: int, classes: Sequence[str]) -> StoredWafers:
        """Every stored wafer of the set, by task id."""
        return _concatenate(
            [w for p in self.chunk_files(set_number) if (w := _read_chunk(p, classes)) is not None],
            classes,
        )

    def lookup(
        self, set_numbers: Iterable[int], task_ids: Iterable[int], classes: Sequence[str]
    ) -> StoredWafers:
        """The stored wafers of `task_ids` among the sets `set_numbers`, in ascending task id
        (tasks without an entry are left out: the caller reads those from their pictures)."""
        wanted = np.unique(np.fromiter((int(t) for t in task_ids), dtype=np.int64))
        parts: list[StoredWafers] = []
        for number in sorted(set(set_numbers)):
            for path in self.chunk_files(number):
                low, high = (int(v) for v in _CHUNK_NAME.match(path.name).groups())  # type: ignore[union-attr]
                lo, hi = np.searchsorted(wanted, [low, high + 1])
                if lo == hi:
                    continue
                chunk = _read_chunk(path, classes)
                if chunk is None:
                    continue
                keep = np.isin(chunk.task_ids, wanted[lo:hi])
                if keep.all():
                    parts.append(chunk)
                elif keep.any():
                    parts.append(_take(chunk, np.flatnonzero(keep)))
        found = _concatenate(parts, classes)
        order = np.argsort(found.task_ids, kind="stable")
        if len(found) and not (order == np.arange(len(found))).all():
            found = _take(found, order)
        # A task stored twice (a chunk imported again after a crash) keeps one entry.
        _, first = np.unique(found.task_ids, return_index=True)
        return found if first.size == len(found) else _take(found, first)


def _take(wafers: StoredWafers, rows: npt.NDArray[np.intp]) -> StoredWafers:
    return StoredWafers(wafers.task_ids[rows], wafers.sources[rows], wafers.maps.subset(rows))


def _read_chunk(path: Path, classes: Sequence[str]) -> StoredWafers | None:
    """One chunk file, checked as a whole; None (with an error logged) when it is unreadable."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays: dict[str, Any] = {name: npz[name] for name in _ARRAYS}
        n = arrays["task_ids"].shape[0]
        maps = WaferMaps(
            flat=arrays["flat"].astype(np.uint8, copy=False),
            offsets=arrays["offsets"].astype(np.int64, copy=False),
            shapes=arrays["shapes"].astype(np.int32, copy=False),
            labels=np.full(n, -1, dtype=np.int16),
            classes=tuple(classes),
            lots=arrays["lots"].astype(np.str_, copy=False),
            wafer_index=arrays["wafer_index"].astype(np.int16, copy=False),
            source_row=arrays["wafer_ids"].astype(np.int64, copy=False),
        )
        if arrays["sources"].shape != (n,):
            raise ValueError("sources do not match the task ids")
        return StoredWafers(arrays["task_ids"].astype(np.int64), arrays["sources"], maps)
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        log.error("wafer store: skipping unreadable %s (%s)", path, exc)
        return None


def _concatenate(parts: Sequence[StoredWafers], classes: Sequence[str]) -> StoredWafers:
    if not parts:
        return _empty(classes)
    if len(parts) == 1:
        return parts[0]
    sizes = [p.maps.offsets[-1] for p in parts]
    offsets: list[npt.NDArray[np.int64]] = [np.zeros(1, np.int64)]
    base = 0
    for part, size in zip(parts, sizes, strict=True):
        offsets.append(part.maps.offsets[1:] + base)
        base += int(size)
    maps = WaferMaps(
        flat=np.concatenate([p.maps.flat for p in parts]),
        offsets=np.concatenate(offsets),
        shapes=np.concatenate([p.maps.shapes for p in parts]),
        labels=np.concatenate([p.maps.labels for p in parts]),
        classes=tuple(classes),
        lots=np.concatenate([p.maps.lots for p in parts]),
        wafer_index=np.concatenate([p.maps.wafer_index for p in parts]),
        source_row=np.concatenate([p.maps.source_row for p in parts]),
    )
    return StoredWafers(
        np.concatenate([p.task_ids for p in parts]),
        np.concatenate([p.sources for p in parts]),
        maps,
    )
