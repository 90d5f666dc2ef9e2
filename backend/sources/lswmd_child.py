"""The child process that reads a wafer-map pickle other than the WM-811K distribution (layer L1).

``pickle_sandbox.read_in_child`` runs ``python -m backend.sources.lswmd_child PATH NAME FOLDER
CLASSES [--keep-unlabelled] [--progress]``: it unpickles PATH with
``checked_pickle.CheckedPandasUnpickler``, converts the frame as ``lswmd`` does in-process, and
leaves the wafers and the load report in FOLDER as plain arrays (``cache.write_cache``), or the
error it met (``pickle_sandbox.write_child_error``, exit status ``REPORTED_STATUS``). NAME is the
path as the caller wrote it, shown in messages and the report; CLASSES is a JSON list.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from collections.abc import Sequence
from pathlib import Path

from backend.sources.cache import write_cache
from backend.sources.checked_pickle import unpickle_checked
from backend.sources.lswmd import open_wafer_file, unpickle_wafers
from backend.sources.pickle_sandbox import REPORTED_STATUS, RESULT_FILE, write_child_error


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend.sources.lswmd_child")
    parser.add_argument("path", type=Path)
    parser.add_argument("name", type=Path)
    parser.add_argument("folder", type=Path)
    parser.add_argument("classes", type=json.loads)
    parser.add_argument("--keep-unlabelled", action="store_true")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash leaves no multi-GB core file
    try:
        with open_wafer_file(args.path) as file:
            wafers, report = unpickle_wafers(
                file,
                args.name,
                zipped=args.name.suffix.lower() == ".zip",
                unpickle=unpickle_checked,
                classes=[str(c) for c in args.classes],
                keep_unlabelled=args.keep_unlabelled,
                progress=args.progress,
            )
        write_cache(args.folder / RESULT_FILE, wafers, report)
    except Exception as err:  # noqa: BLE001 - the process boundary: the parent raises it again
        write_child_error(args.folder, err, args.name)
        return REPORTED_STATUS
    return 0


if __name__ == "__main__":
    sys.exit(main())
