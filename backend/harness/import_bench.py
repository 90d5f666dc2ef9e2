"""Speed of `import-wafers` against a running Label Studio (prints numbers; not a test).

    LABEL_STUDIO_URL=... LABEL_STUDIO_API_KEY=... .venv/bin/python -m backend.harness.import_bench \
        [--history 2000] [--new 5000] [--per-set 2500]

Creates a project, imports `--history` labelled WM-811K wafers as set 0, then `--new` labelled
wafers as new sets (their labels are not imported), then the same again (every wafer skipped),
and times the two Label Studio calls that the skip check makes per chunk: the count of a chunk's
wafer-id range, and the listing of a chunk that is there already.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from backend.label_config import DEFAULT_LABEL_CONFIG, parse_label_config
from backend.labelstudio import IMPORT_CHUNK, LabelStudioClient
from backend.settings import Settings
from backend.sources import load_wafers
from backend.wafer_sets import (
    WM811K_SOURCE,
    cut_into_sets,
    existing_wafers,
    import_wafers,
    wafer_filters,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--history", type=int, default=2000)
    parser.add_argument("--new", type=int, default=5000)
    parser.add_argument("--per-set", type=int, default=2500)
    args = parser.parse_args()
    settings = Settings.from_env(os.environ)
    labels = parse_label_config(DEFAULT_LABEL_CONFIG.read_text())
    wafers, _ = load_wafers(settings.data_path, labels.failure_types, settings.cache_dir)
    url, key = settings.require_label_studio()
    with LabelStudioClient.connect(url, key) as client:
        project = client.create_project(f"bench import {int(time.time())}", labels_xml())
        rows = np.arange(len(wafers))
        history, new = rows[: args.history], rows[args.history : args.history + args.new]
        started = time.perf_counter()
        import_wafers(
            client, project, wafers, labels, [history], source=WM811K_SOURCE, initial=True
        )
        seconds = time.perf_counter() - started
        print(
            f"set 0 with labels: {len(history)} wafers in {seconds:.1f} s = "
            f"{len(history) / seconds:.1f} wafers/s"
        )
        sets = [new[s] for s in cut_into_sets(wafers.lots[new], per_set=args.per_set)]
        started = time.perf_counter()
        outcome = import_wafers(client, project, wafers, labels, sets, source=WM811K_SOURCE)
        seconds = time.perf_counter() - started
        print(
            f"new sets: {outcome.summary()} in {seconds:.1f} s = "
            f"{outcome.total / seconds:.1f} wafers/s"
        )
        started = time.perf_counter()
        again = import_wafers(client, project, wafers, labels, sets, source=WM811K_SOURCE)
        seconds = time.perf_counter() - started
        print(
            f"re-import: {again.summary()} in {seconds:.1f} s = "
            f"{again.skipped / seconds:.1f} wafers/s checked"
        )
        ids = [int(w) for w in wafers.source_row[new[:IMPORT_CHUNK]]]
        started = time.perf_counter()
        client.count_tasks(project, wafer_filters("not-there", min(ids), max(ids)))
        print(
            f"count of a chunk's range ({len(history) + len(new)} tasks in the project): "
            f"{time.perf_counter() - started:.2f} s"
        )
        started = time.perf_counter()
        found = existing_wafers(client, project, WM811K_SOURCE, ids)
        print(
            f"existing_wafers of a chunk of {len(ids)} imported wafers: {len(found)} found in "
            f"{time.perf_counter() - started:.2f} s"
        )


def labels_xml() -> str:
    return DEFAULT_LABEL_CONFIG.read_text()


if __name__ == "__main__":
    main()
