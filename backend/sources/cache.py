"""What a load did (``LoadReport``), how source rows are sorted into kept and dropped, and the
conversion cache that makes the second load of a 2 GB pickle take a second.

Every source row lands in exactly one bucket, checked in this order: no failure type (``unlabelled``,
skipped unless the caller keeps unlabelled wafers), a failure type not in ``classes``
(``unknown_labels``), an empty or invalid die map (``empty_maps``), else kept. So
``total_rows == labelled + unlabelled + empty_maps + sum(unknown_labels.values())``.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import zipfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from backend.files import atomic_writer
from backend.wafers import WaferMaps

CACHE_FORMAT_VERSION = 1
UNLABELLED_CODE = -1
UNKNOWN_LABEL_CODE = -2
_ARRAY_FIELDS = ("flat", "offsets", "shapes", "labels", "lots", "wafer_index", "source_row")


@dataclass(frozen=True)
class LoadReport:
    """Counts of what one ``load_wafers`` call read, kept and dropped, and how long it took.

    ``labelled`` wafers were kept; ``unlabelled`` rows have no failure type (skipped unless kept on
    request); ``empty_maps`` rows were dropped for a zero-size die map, one with no die on the wafer,
    or die values outside 0..2; ``unknown_labels`` maps each failure-type text not in ``classes`` to
    the number of rows dropped for it. A cache hit carries the numbers of the original conversion,
    with ``from_cache=True``, its own ``seconds`` and the ``cache_file`` it came from.
    """

    source: str
    total_rows: int
    labelled: int
    unlabelled: int
    empty_maps: int
    unknown_labels: dict[str, int]
    from_cache: bool
    seconds: float
    cache_file: str | None = None

    def summary(self) -> str:
        """A few lines for a person: where from, how many kept, how many dropped and why."""
        how = "from cache" if self.from_cache else "converted"
        lines = [
            f"{self.source}: {how} in {self.seconds:.1f} s",
            f"{self.total_rows:,} rows: {self.labelled:,} labelled wafers kept, "
            f"{self.unlabelled:,} without a failure type",
            f"dropped: {self.empty_maps:,} empty or invalid die maps, "
            f"{sum(self.unknown_labels.values()):,} with a failure type not in the classes",
        ]
        if self.unknown_labels:
            worst = sorted(self.unknown_labels.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
            lines.append("unknown failure types: " + ", ".join(f"{k!r} x{v:,}" for k, v in worst))
        if self.cache_file:
            lines.append(f"cache: {self.cache_file}")
        return "\n".join(lines)


def label_codes(texts: npt.NDArray[np.str_], classes: Sequence[str]) -> npt.NDArray[np.int16]:
    """Code of each failure-type text: its index in ``classes``, -1 for '' (unlabelled), -2 unknown."""
    uniques, inverse = np.unique(texts, return_inverse=True)
    lookup = {name: code for code, name in enumerate(classes)}
    unique_codes = np.array(
        [
            UNLABELLED_CODE if u == "" else lookup.get(str(u), UNKNOWN_LABEL_CODE)
            for u in uniques.tolist()
        ],
        dtype=np.int16,
    )
    return unique_codes[inverse.reshape(-1)] if texts.size else np.zeros(0, dtype=np.int16)


def wanted_rows(codes: npt.NDArray[np.int16], keep_unlabelled: bool) -> npt.NDArray[np.bool_]:
    """Rows whose label lets them be kept, before their die maps are checked."""
    return codes >= (UNLABELLED_CODE if keep_unlabelled else 0)


def sort_report(
    source: str,
    texts: npt.NDArray[np.str_],
    codes: npt.NDArray[np.int16],
    wanted: npt.NDArray[np.bool_],
    kept: npt.NDArray[np.bool_],
    seconds: float,
) -> LoadReport:
    """The report for rows sorted by ``label_codes`` / ``wanted_rows`` and a die-map check (``kept``)."""
    bad_map = wanted & ~kept
    unknown = Counter(texts[codes == UNKNOWN_LABEL_CODE].tolist())
    return LoadReport(
        source=source,
        total_rows=int(codes.shape[0]),
        labelled=int(np.count_nonzero(kept & (codes >= 0))),
        unlabelled=int(np.count_nonzero((codes == UNLABELLED_CODE) & ~bad_map)),
        empty_maps=int(np.count_nonzero(bad_map)),
        unknown_labels={str(k): int(v) for k, v in sorted(unknown.items())},
        from_cache=False,
        seconds=seconds,
    )


def cache_file_for(
    source: Path, classes: Sequence[str], cache_dir: Path, keep_unlabelled: bool
) -> Path:
    """The cache file name for ``source`` as it is now: resolved path, size, mtime and classes.

    Any change to the source file, the class list, ``keep_unlabelled`` or the cache format gives a
    new name, so a stale cache is never read.
    """
    resolved = source.resolve()
    stat = resolved.stat()
    key = json.dumps(
        [
            CACHE_FORMAT_VERSION,
            str(resolved),
            stat.st_size,
            stat.st_mtime_ns,
            list(classes),
            keep_unlabelled,
        ]
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return cache_dir / f"{resolved.stem}-{digest}.wafers.npz"


def write_cache(path: Path, wafers: WaferMaps, report: LoadReport) -> None:
    """Save ``wafers`` and ``report`` to ``path`` atomically (`backend.files.atomic_writer`), so a reader never sees half a file. Uncompressed: die maps load fastest so."""
    skip = ("from_cache", "seconds", "cache_file")
    fields = {k: v for k, v in asdict(report).items() if k not in skip}
    arrays: dict[str, Any] = {name: getattr(wafers, name) for name in _ARRAY_FIELDS}
    arrays["classes"] = np.array(wafers.classes, dtype=np.str_)
    arrays["report"] = np.array(json.dumps(fields))
    arrays["format_version"] = np.array(CACHE_FORMAT_VERSION)
    with atomic_writer(path) as f:  # readable by all: a CI cache may be shared
        np.savez(f, **arrays)


def read_cache(path: Path, seconds_since: float) -> tuple[WaferMaps, LoadReport] | None:
    """What ``write_cache`` saved, or None when there is no usable cache file at ``path``.

    An unreadable or outdated file is reported on stderr and treated as missing (it will be
    rewritten). ``seconds_since`` is the ``time.perf_counter()`` the load started at.
    """
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as saved:
            if int(saved["format_version"]) != CACHE_FORMAT_VERSION:
                return None
            arrays = {name: saved[name] for name in _ARRAY_FIELDS}
            classes = tuple(str(c) for c in saved["classes"].tolist())
            fields = json.loads(str(saved["report"]))
        wafers = WaferMaps(classes=classes, **arrays)
        report = LoadReport(
            **fields,
            from_cache=True,
            seconds=time.perf_counter() - seconds_since,
            cache_file=str(path),
        )
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as err:
        print(f"ignoring unreadable cache file {path}: {err}", file=sys.stderr)
        return None
    return wafers, report
