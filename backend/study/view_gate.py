"""What drawing only the unsure wafers 8 times costs at the promise: `python -m backend view-gate RUN`.

Layer L2 (study). For a demo run (`demo --out RUN`) it takes the first model (trained offline on
set 0) and the set it opened, predicts all 8 drawings of the set's wafers and of the first
model's held-out wafers (set 0's stable hold-out, keyed by wafer identity as the training was),
and routes the set at the promise (`backend.calibration.promise_cut`) by each measure: one
drawing (margin), all 8 (eight-views), and 8 only for wafers whose one-view ``p1 - p2`` is under
each sure margin (eight-views-when-unsure). Each row gives the drawings the model made per
wafer, the engineer share and the true accuracy of the set (RUN/truth.csv). Writes
RUN/view-gate.json and RUN/view-gate.md.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from backend.calibration import promise_cut
from backend.classifier import WaferClassifier, load_version, pick_device
from backend.encoding import encode_wafers
from backend.files import atomic_write_text
from backend.model_store import ModelStore
from backend.splits import stable_holdout, wafer_key
from backend.study.simulate import json_safe
from backend.uncertainty import (
    Measure,
    first_view_for_sure,
    first_view_sure,
    mean_over_views,
    uncertainty,
)
from backend.wafer_sets import INITIAL_SET, WM811K_SOURCE
from backend.wafer_store import WaferStore

#: One-view sure margins compared (the served one is `backend.uncertainty.SURE_ONE_VIEW_MARGIN`).
SURE_MARGINS = (0.9, 0.95, 0.99, 0.999)


def _drawn(
    classifier: WaferClassifier,
    store: WaferStore,
    set_number: int,
    label: str,
    validation_fraction: float | None = None,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """All 8 drawings of the set's wafers and their wafer ids; with `validation_fraction`, of
    its stable hold-out only (keyed by wafer identity, as `backend.first_model` holds out)."""
    stored = store.read_set(set_number, classifier.card.failure_types)
    rows = stored.maps.source_row
    codes = encode_wafers(stored.maps, classifier.card.image_size)
    if validation_fraction is not None:
        keys = np.asarray([wafer_key(WM811K_SOURCE, int(w)) for w in rows], dtype=np.int64)
        held = stable_holdout(keys, validation_fraction)
        codes, rows = codes[held], rows[held]
    return classifier.predict_views(codes, 8, progress=label), rows


def _route(
    val: npt.NDArray[np.float64],
    val_truth: npt.NDArray[np.int64],
    drawn: npt.NDArray[np.float64],
    truth: npt.NDArray[np.int64],
    measure: Measure,
    sure_margin: float | None,
    target: float,
    confidence: float,
) -> dict[str, Any]:
    if sure_margin is not None:
        val = first_view_for_sure(val, sure_margin)
        drawn = first_view_for_sure(drawn, sure_margin)
        unsure = int((~first_view_sure(drawn, sure_margin)).sum())
        per_wafer = 1 + 7 * unsure / drawn.shape[1]
    elif measure is Measure.MARGIN:
        val, drawn, per_wafer = val[0], drawn[0], 1.0
    else:
        per_wafer = 8.0
    val_scores = uncertainty(val, measure)
    val_right = mean_over_views(val)[0].argmax(axis=1) == val_truth
    scores = uncertainty(drawn, measure)
    right = mean_over_views(drawn)[0].argmax(axis=1) == truth
    cut = promise_cut(val_scores, val_right, scores, target, confidence).threshold
    auto = scores <= cut
    wrong = int((auto & ~right).sum())
    return {
        "measure": measure.value,
        "sure_margin": sure_margin,
        "drawings_per_wafer": per_wafer,
        "model_accuracy": float(right.mean()),
        "held_out_accuracy": float(val_right.mean()),
        "engineer": int((~auto).sum()),
        "engineer_share": float((~auto).mean()),
        "wrong_auto": wrong,
        "accuracy": 1.0 - wrong / len(truth),
        "met": 1.0 - wrong / len(truth) >= target,
    }


def view_gate_study(
    run: Path,
    target: float = 0.995,
    confidence: float = 0.95,
    validation_fraction: float = 0.15,
    sure_margins: Sequence[float] = SURE_MARGINS,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Route the first model's set of demo run `run` by each measure (module docstring)."""
    state = json.loads((run / "demo-state.json").read_text())
    project = int(state["project"])
    with (run / "truth.csv").open(newline="") as handle:
        truth_of = {int(r["wafer_id"]): r["failure_type"] for r in csv.DictReader(handle)}
    models = ModelStore.for_project(run / "models", project, pick_device("cpu"))
    store = WaferStore.for_project(run / "models", project)
    first = next(
        (r for r in store.routings() if r.decided and r.model_version.endswith("-set0")), None
    )
    if first is None:
        raise ValueError(f"{run}: no set was opened by a first model (a version named *-set0)")
    classifier = load_version(models.path_of(first.model_version), pick_device("cpu"))
    names = list(classifier.card.failure_types)

    def classes(rows: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        return np.asarray([names.index(truth_of[int(w)]) for w in rows], dtype=np.int64)

    val, val_rows = _drawn(
        classifier, store, INITIAL_SET, "set 0 held out (8 views)", validation_fraction
    )
    val_truth = classes(val_rows)
    label = f"set {first.set_number} (8 views)"
    drawn, rows = _drawn(classifier, store, first.set_number, label)
    truth = classes(rows)
    routes = [
        _route(val, val_truth, drawn, truth, Measure.MARGIN, None, target, confidence),
        _route(val, val_truth, drawn, truth, Measure.EIGHT_VIEWS, None, target, confidence),
    ]
    for m in sure_margins:
        routes.append(
            _route(
                val, val_truth, drawn, truth, Measure.EIGHT_VIEWS_WHEN_UNSURE, m, target, confidence
            )
        )
    for r in routes:
        log(
            f"{r['measure']} {r['sure_margin'] or ''}: {r['drawings_per_wafer']:.2f} drawings a "
            f"wafer, {r['engineer']:,} to engineers, {r['wrong_auto']} wrong auto labels"
        )
    results = {
        "run": str(run),
        "model_version": first.model_version,
        "set": first.set_number,
        "wafers": len(truth),
        "held_out_wafers": len(val_truth),
        "target_accuracy": target,
        "confidence": confidence,
        "routes": routes,
    }
    atomic_write_text(run / "view-gate.json", json.dumps(json_safe(results), indent=2))
    atomic_write_text(run / "view-gate.md", view_gate_markdown(results))
    return results


def view_gate_markdown(results: dict[str, Any]) -> str:
    lines = [
        f"Set {results['set']} ({results['wafers']:,} wafers) routed by {results['model_version']}"
        f" at the promise ({100 * results['target_accuracy']:g}% at "
        f"{100 * results['confidence']:g}%), calibrated on its {results['held_out_wafers']:,} "
        "held-out wafers; engineer labels without audit wafers.",
        "",
        "| measure | sure one-view margin | drawings a wafer | engineer (share) | wrong auto "
        "| accuracy |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results["routes"]:
        margin_cell = f"{r['sure_margin']:g}" if r["sure_margin"] is not None else ""
        lines.append(
            f"| {r['measure']} | {margin_cell} | {r['drawings_per_wafer']:.2f} | "
            f"{r['engineer']:,} ({100 * r['engineer_share']:.2f}%) | {r['wrong_auto']} | "
            f"{100 * r['accuracy']:.2f}%{'' if r['met'] else ' (missed)'} |"
        )
    return "\n".join(lines) + "\n"
