"""Routing methods compared after a study run, on the calibrated loop's own models.

Layer L2. `python -m backend routing-study DIR` re-reads a finished (or partly finished) study run
in DIR: for each set k, the model that predicted it (``models/calibrated/set<k>.pt``) and the
held-out wafers its routing was calibrated on (``phases/calibrated/set<k>.npz``). It predicts both
in all 8 symmetric drawings once (``DIR/routing-study/evidence-set<k>.npz``, so a rerun is
quick), then routes every set with every method of `backend.study.routing_methods` at the promised
accuracy and writes ``results.json``, ``results.md`` and ``accuracy_vs_engineer_ratio.png`` to
``DIR/routing-study/``. The reject option (the initial model alone on every later wafer) is
scored the same way.

The models were trained on the labels the calibrated loop's own routing produced, so another
method's numbers here are what it would give with those models; its own loop would differ only
through its few wrong auto labels in the training data.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from backend.classifier import load_version
from backend.files import atomic_write_text, atomic_writer
from backend.study import plots
from backend.study.metrics import confusion_matrix, macro_f1
from backend.study.report import STUDY_REFERENCE, SetOutcome, summarize
from backend.study.routing_methods import (
    METHODS,
    NEEDS_VIEWS,
    Evidence,
    accuracy_curve,
    engineer_share_for,
    route_at_target,
)
from backend.study.simulate import Study, json_safe
from backend.study.temperature import expected_calibration_error, fit_temperature, softmax

#: The study's best published labeling accuracy; the issue's bar is half its engineer ratio there.
STUDY_BEST_ACCURACY = 0.9957


#: Which held-out wafers a set's cut is calibrated on: the initial set's (drawn at random, like
#: the sets, and never trained on by a bounded run's models) or the phase's own (the
#: person-labelled hold-out the loop used, which fills up with engineer-labelled wafers, i.e.
#: wafers chosen for being uncertain).
HOLD_OUTS = ("initial", "phase")


def _evidence_path(study: Study, name: str, hold_out: str) -> Path:
    return study.out / "routing-study" / f"evidence-{name}-{hold_out}.npz"


def collect_evidence(
    study: Study,
    views: int = 8,
    log: Callable[[str], None] = print,
    reject_option_views: int = 1,
    hold_out: str = "initial",
) -> dict[str, Evidence]:
    """Model outputs for every finished set of the calibrated loop (in ``views`` drawings) and
    for the reject option (in ``reject_option_views``; 0 leaves it out), predicted once and kept
    in DIR/routing-study; sets without a kept model are left out. ``hold_out`` (`HOLD_OUTS`)
    says which held-out wafers come with each set."""
    if hold_out not in HOLD_OUTS:
        raise ValueError(f"hold_out must be one of {', '.join(HOLD_OUTS)}, got {hold_out!r}")
    if hold_out == "initial" and study.config.retrain != "bounded":
        raise ValueError(
            "the initial set's held-out wafers are only held out of every model in a "
            "--retrain bounded run; use the phase hold-out"
        )
    out: dict[str, Evidence] = {}
    jobs: list[tuple[str, Path, Path, npt.NDArray[np.intp]]] = []
    for k, members in enumerate(study.split.sets, start=1):
        jobs.append(
            (
                f"set{k}",
                study.phase_model_path("calibrated", k),
                study.out / "phases" / "calibrated" / f"set{k}.npz",
                members,
            )
        )
    jobs.append(
        (
            "reject-option" if reject_option_views else "",
            study.out / "models" / "initial.pt",
            study.out / "phases" / "initial.npz",
            study.split.rest(),
        )
    )
    for name, model_path, phase_path, members in jobs:
        if not name:
            continue
        wanted = reject_option_views if name == "reject-option" else views
        path = _evidence_path(study, name, hold_out)
        if path.exists():
            with np.load(path) as data:
                if data["logits"].shape[0] >= wanted:
                    out[name] = Evidence(
                        data["logits"][:wanted],
                        data["true"],
                        data["val_logits"][:wanted],
                        data["val_true"],
                    )
                    continue
        if not model_path.exists() or not phase_path.exists():
            continue
        held = phase_path if hold_out == "phase" else study.out / "phases" / "initial.npz"
        with np.load(held) as phase:
            if "val_members" not in phase or not len(phase["val_members"]):
                log(f"{held}: no held-out wafers kept (a run from before they were); skipped")
                continue
            val_members = phase["val_members"]
            val_true = phase["val_true"]
        if not len(study.codes):
            study.prepare()
        model = load_version(model_path, study.device)
        start = time.perf_counter()
        logits = model.predict_logits(
            study.codes[members], wanted, progress=f"{name}: {wanted} views"
        )
        val_logits = model.predict_logits(study.codes[val_members], wanted)
        seconds = time.perf_counter() - start
        log(
            f"{name}: {len(members) + len(val_members):,} wafers x {wanted} views in {seconds:.0f} s "
            f"({wanted * (len(members) + len(val_members)) / seconds:,.0f} drawings/s)"
        )
        e = Evidence(logits, study.true[members], val_logits, val_true.astype(np.int64))
        with atomic_writer(path) as handle:
            np.savez(
                handle, logits=e.logits, true=e.true, val_logits=e.val_logits, val_true=e.val_true
            )
        out[name] = e
    return out


def _curve_points(
    score: npt.NDArray[np.float64], label: npt.NDArray[np.int64], true: npt.NDArray[np.int64]
) -> dict[str, list[float]]:
    ratio, acc = accuracy_curve(score, label, true)
    keep = np.unique(np.linspace(0, len(ratio) - 1, 400).astype(np.int64))
    return {"engineer_ratio": ratio[keep].tolist(), "accuracy": acc[keep].tolist()}


def compare_methods(
    study: Study,
    evidence: dict[str, Evidence],
    target: float,
    confidence: float,
    methods: Sequence[str] = tuple(METHODS),
) -> dict[str, Any]:
    """Every method on every set at ``target``: the rows of results.json."""
    labels = study.labels
    sets = sorted((n for n in evidence if n.startswith("set")), key=lambda n: int(n[3:]))
    rows: list[dict[str, Any]] = []
    for name in methods:
        for scope, parts in (("loop", sets), ("reject option", ["reject-option"])):
            parts = [p for p in parts if p in evidence]
            if not parts or (name in NEEDS_VIEWS and any(evidence[p].views < 8 for p in parts)):
                continue
            outcomes, met, scores, autos, trues = [], [], [], [], []
            for p in parts:
                e = evidence[p]
                scored = METHODS[name](e, np.random.default_rng(0))
                routed = route_at_target(scored, e.true, e.val_true, target, confidence)
                number = int(p[3:]) if p.startswith("set") else 0
                outcomes.append(SetOutcome(number, e.true, routed.final, routed.engineer))
                met.append(bool(np.mean(routed.final == e.true) >= target))
                scores.append(scored.score)
                autos.append(scored.label)
                trues.append(e.true)
            row = summarize(
                name,
                scope,
                f"calibrated for {100 * target:g}%",
                outcomes,
                labels.failure_types,
                labels.defect_classes,
            )
            score, auto, true = np.concatenate(scores), np.concatenate(autos), np.concatenate(trues)
            row |= {
                "scope": scope,
                "target_met_in_sets": int(sum(met)),
                "sets": len(met),
                "best_cut_engineer_ratio_for_study_best": engineer_share_for(
                    score, auto, true, STUDY_BEST_ACCURACY
                ),
                "model_accuracy": float(np.mean(auto == true)),
                "model_macro_f1": macro_f1(
                    confusion_matrix(true, auto, len(labels.failure_types)), labels.defect_classes
                ),
                "curve": _curve_points(score, auto, true),
            }
            rows.append(row)
    return {"methods": rows, "calibration": _calibration_errors(evidence, sets)}


def _calibration_errors(evidence: dict[str, Evidence], sets: Sequence[str]) -> list[dict[str, Any]]:
    """ECE of each set's plain softmax and after temperature scaling fitted on its held-out wafers."""
    out = []
    for name in [*sets, "reject-option"]:
        if name not in evidence:
            continue
        e = evidence[name]
        t = fit_temperature(e.val_logits[0], e.val_true)
        out.append(
            {
                "set": name,
                "temperature": t,
                "ece_before": expected_calibration_error(softmax(e.logits[0]), e.true),
                "ece_after": expected_calibration_error(softmax(e.logits[0], t), e.true),
            }
        )
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def routing_markdown(results: dict[str, Any], target: float) -> str:
    lines = [
        f"Routing methods at a promised {100 * target:g}% labeling accuracy "
        f"(cut calibrated per set at {100 * results['confidence']:g}% confidence on the "
        f"{results['hold_out']} hold-out).",
        "",
        "| method | scope | wafers | engineer ratio | errors | labeling accuracy | macro-F1 "
        "| sets meeting target | model accuracy / macro-F1 | best cut's engineer ratio for 99.57% |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in results["methods"]:
        lines.append(
            f"| {m['name']} | {m['scope']} | {m['total']:,} | {_pct(m['engineer_ratio'])} | "
            f"{m['errors']:,} | {_pct(m['accuracy'])} | {m['macro_f1']:.4f} | "
            f"{m['target_met_in_sets']}/{m['sets']} | {_pct(m['model_accuracy'])} / "
            f"{m['model_macro_f1']:.3f} | "
            f"{_pct(m['best_cut_engineer_ratio_for_study_best'])} |"
        )
    lines += ["", "Per set (engineer ratio / labeling accuracy):", ""]
    loop_rows = [m for m in results["methods"] if m["scope"] == "loop"]
    if loop_rows:
        n_sets = len(loop_rows[0]["per_set"])
        lines.append(
            "| method | " + " | ".join(f"set {s['set']}" for s in loop_rows[0]["per_set"]) + " |"
        )
        lines.append("|---|" + "---:|" * n_sets)
        for m in loop_rows:
            cells = [f"{_pct(s['engineer_ratio'])} / {_pct(s['accuracy'])}" for s in m["per_set"]]
            lines.append(f"| {m['name']} | " + " | ".join(cells) + " |")
    lines += ["", "| set | temperature | ECE before | ECE after |", "|---|---:|---:|---:|"]
    for c in results["calibration"]:
        lines.append(
            f"| {c['set']} | {c['temperature']:.3f} | {c['ece_before']:.4f} | {c['ece_after']:.4f} |"
        )
    lines += [
        "",
        "Published (the study): "
        + "; ".join(
            f"{r['name']}: {_pct(r['engineer_ratio'])} engineer, {_pct(r['accuracy'])}"
            for r in STUDY_REFERENCE
        ),
    ]
    return "\n".join(lines) + "\n"


def run_routing_study(
    study: Study,
    target: float = 0.995,
    confidence: float = 0.9,
    views: int = 8,
    log: Callable[[str], None] = print,
    reject_option_views: int = 1,
    hold_out: str = "initial",
) -> dict[str, Any]:
    """Collect what is missing, compare every method, write DIR/routing-study/results.*.

    The reject option (the initial model on every later wafer: 155,655 at full scale) is
    predicted in ``reject_option_views`` drawings (0: left out)."""
    evidence = collect_evidence(study, views, log, reject_option_views, hold_out)
    if not evidence:
        raise ValueError(
            f"{study.out} has no calibrated-loop models with kept held-out wafers to compare on"
        )
    results = compare_methods(study, evidence, target, confidence)
    results |= {
        "target_accuracy": target,
        "confidence": confidence,
        "views": views,
        "reject_option_views": reject_option_views,
        "hold_out": hold_out,
    }
    out = study.out / "routing-study" / hold_out
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(json_safe(results), indent=2))
    atomic_write_text(out / "results.md", routing_markdown(results, target))
    plots.routing_curves(results["methods"], out / "accuracy_vs_engineer_ratio.png")
    return results
