"""How often a set misses the promised accuracy: the per-set promise against the expected-accuracy
cut, on a study run's own predictions. `python -m backend promise-check DIR`.

Layer L2 (study). For each set of the calibrated loop in DIR it takes the model outputs the
routing study keeps (`backend.study.routing_study.collect_evidence`: the set's wafers and the
held-out wafers its cut is calibrated on, with their true labels), then `resamples` times draws
a set of `set_size` wafers from the set and a held-out sample of the same size as the kept one
(both with replacement), routes the drawn set by margin with each rule, and counts the drawn
sets whose labeling accuracy (engineer labels right, auto labels as the model said) falls below
the target. It writes DIR/promise-check/results.json and results.md.

With ``pool`` (`--pool`), the wafers come from one model instead: the initial model's predictions
on every later wafer of the run (the reject option's), from which each draw takes a calibration
sample of `calibration_size` wafers and a disjoint set of `set_size`, both without replacement.
Both samples are then random wafers of the same stream, which is what the promise assumes, and
the held-out sample can be as large as a fab's history gives (a 15% hold-out of 17,295 wafers is
~2,600), whatever size the run's own hold-out had.

The rules compared:
- ``expected``: `backend.calibration.calibrate_scores` at 90% per threshold (the older served
  rule, WAFER_PROMISE_CONFIDENCE=0), which bounds the expected auto-label error;
- ``promise``: `backend.calibration.promise_cut` at `confidence` (the served rule, its exact
  prediction bound), which keeps the drawn set's own accuracy at the target with that
  probability;
- ``promise-union``: the same promise by its older union of two bounds (an error-rate bound and
  the set's scatter, each at half the failure probability), served until 2026-12-04.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from backend.calibration import calibrate_scores, promise_cut
from backend.classifier import load_version, pick_device
from backend.encoding import encode_wafers
from backend.files import atomic_write_text
from backend.model_store import ModelStore
from backend.predictions import wafer_probabilities
from backend.study.routing_methods import Evidence
from backend.study.routing_study import collect_evidence
from backend.study.simulate import Study, json_safe
from backend.study.temperature import softmax
from backend.uncertainty import Measure, mean_over_views, uncertainty
from backend.wafer_store import WaferStore


@dataclass(frozen=True)
class RuleFigures:
    """One rule over all drawn sets."""

    sets: int
    missed: int
    engineer_ratio: float
    accuracy: float
    worst_accuracy: float

    @property
    def miss_rate(self) -> float:
        return self.missed / self.sets if self.sets else 0.0


Draw = tuple[
    npt.NDArray[np.float64], npt.NDArray[np.bool_], npt.NDArray[np.float64], npt.NDArray[np.bool_]
]


def _margin_scores(
    logits: npt.NDArray[np.float32],
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    probs = softmax(logits[0])
    return uncertainty(probs, Measure.MARGIN), probs.argmax(axis=1).astype(np.int64)


def check_promise(
    evidence: Sequence[Evidence],
    target: float,
    confidence: float,
    resamples: int,
    set_size: int | None,
    seed: int = 0,
) -> dict[str, RuleFigures]:
    """Draw `resamples` sets (spread over the evidence's sets, with replacement, each with a
    resampled hold-out of its own size) and route each by every rule."""
    rng = np.random.default_rng(seed)
    prepared = []
    for e in evidence:
        scores, guess = _margin_scores(e.logits)
        val_scores, val_guess = _margin_scores(e.val_logits)
        prepared.append((scores, guess == e.true, val_scores, val_guess == e.val_true))
    draws: list[Draw] = []
    for i in range(resamples):
        scores, right, val_scores, val_right = prepared[i % len(prepared)]
        pick = rng.integers(0, len(scores), set_size or len(scores))
        held = rng.integers(0, len(val_scores), len(val_scores))
        draws.append((scores[pick], right[pick], val_scores[held], val_right[held]))
    return _route_draws(draws, target, confidence)


def check_promise_pooled(
    pool: Evidence,
    target: float,
    confidence: float,
    resamples: int,
    set_size: int,
    calibration_size: int,
    seed: int = 0,
) -> dict[str, RuleFigures]:
    """Draw a calibration sample and a disjoint set from one model's predictions, `resamples`
    times, and route each set by every rule."""
    if set_size + calibration_size > len(pool.true):
        raise ValueError(
            f"the pool holds {len(pool.true):,} wafers: fewer than a set of {set_size:,} and "
            f"{calibration_size:,} held-out wafers"
        )
    rng = np.random.default_rng(seed)
    scores, guess = _margin_scores(pool.logits)
    right = guess == pool.true
    draws: list[Draw] = []
    for _ in range(resamples):
        order = rng.permutation(len(scores))
        held = order[:calibration_size]
        pick = order[calibration_size : calibration_size + set_size]
        draws.append((scores[pick], right[pick], scores[held], right[held]))
    return _route_draws(draws, target, confidence)


def rule_cuts(
    val_scores: npt.NDArray[np.float64],
    val_right: npt.NDArray[np.bool_],
    scores: npt.NDArray[np.float64],
    target: float,
    confidence: float,
) -> dict[str, float]:
    """Each compared rule's threshold for a set with `scores` (auto when score <= threshold),
    calibrated on the held-out wafers' scores and rightness."""
    return {
        "expected": calibrate_scores(val_scores, val_right, target, 0.9, scores).threshold,
        "promise": promise_cut(val_scores, val_right, scores, target, confidence).threshold,
        "promise-union": promise_cut(
            val_scores, val_right, scores, target, confidence, "union"
        ).threshold,
    }


def _route_draws(draws: Sequence[Draw], target: float, confidence: float) -> dict[str, RuleFigures]:
    outcomes: dict[str, list[tuple[bool, float, float]]] = {
        "expected": [],
        "promise": [],
        "promise-union": [],
    }
    for s, ok, vs, vok in draws:
        n = len(s)
        for name, cut in rule_cuts(vs, vok, s, target, confidence).items():
            auto = s <= cut
            accuracy = 1.0 - float((auto & ~ok).sum()) / n
            outcomes[name].append((accuracy < target, 1.0 - float(auto.mean()), accuracy))
    return {
        name: RuleFigures(
            sets=len(rows),
            missed=sum(m for m, _, _ in rows),
            engineer_ratio=float(np.mean([r for _, r, _ in rows])),
            accuracy=float(np.mean([a for _, _, a in rows])),
            worst_accuracy=float(min(a for _, _, a in rows)),
        )
        for name, rows in outcomes.items()
    }


def run_promise_check(
    study: Study,
    target: float = 0.995,
    confidence: float = 0.95,
    resamples: int = 200,
    set_size: int | None = None,
    log: Callable[[str], None] = print,
    pool: bool = False,
    calibration_size: int = 2600,
) -> dict[str, Any]:
    """Collect the evidence a routing study keeps (one view), check every rule, write results."""
    # The initial set's random hold-out when the run's models never trained on it (bounded
    # retraining), as the backend calibrates on random person-labelled wafers; else the phase's.
    hold_out = "initial" if study.config.retrain == "bounded" else "phase"
    evidence = collect_evidence(
        study, views=1, log=log, reject_option_views=1 if pool else 0, hold_out=hold_out
    )
    if pool:
        if "reject-option" not in evidence:
            raise ValueError(f"{study.out} has no initial model's predictions to draw from")
        whole = evidence["reject-option"]
        size = set_size or len(study.split.sets[0])
        figures = check_promise_pooled(whole, target, confidence, resamples, size, calibration_size)
        source = f"pool: the initial model on {len(whole.true):,} later wafers"
        held_out: Any = calibration_size
    else:
        sets = [e for name, e in sorted(evidence.items()) if name.startswith("set")]
        if not sets:
            raise ValueError(f"{study.out} has no calibrated-loop sets with kept held-out wafers")
        figures = check_promise(sets, target, confidence, resamples, set_size)
        source = f"the calibrated loop's {len(sets)} sets, {hold_out} hold-out"
        held_out = [len(e.val_true) for e in sets]
        size = set_size or 0
    results = {
        "target_accuracy": target,
        "confidence": confidence,
        "resamples": resamples,
        "set_size": size or "as the study's sets",
        "held_out_wafers": held_out,
        "source": source,
        "rules": {name: {**f.__dict__, "miss_rate": f.miss_rate} for name, f in figures.items()},
    }
    out = study.out / "promise-check"
    atomic_write_text(out / "results.json", json.dumps(json_safe(results), indent=2))
    atomic_write_text(out / "results.md", promise_markdown(results))
    return results


def promise_markdown(results: dict[str, Any]) -> str:
    target, confidence = results["target_accuracy"], results["confidence"]
    lines = [
        f"Sets below {100 * target:g}% over {results['resamples']} drawn sets "
        f"(set size: {results['set_size']}; held-out wafers: {results['held_out_wafers']}; "
        f"{results['source']})",
        "",
        "| rule | sets below target | share | promised at most | engineer share "
        "| mean accuracy | worst |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    per_set = f"{100 * (1 - confidence):.1f}%"
    promised = {"expected": "(none per set)", "promise": per_set, "promise-union": per_set}
    for name, f in results["rules"].items():
        lines.append(
            f"| {name} | {f['missed']} | {100 * f['miss_rate']:.1f}% | {promised[name]} | "
            f"{100 * f['engineer_ratio']:.2f}% | {100 * f['accuracy']:.3f}% | "
            f"{100 * f['worst_accuracy']:.3f}% |"
        )
    return "\n".join(lines) + "\n"


# ---- a demo run's sets, replayed by each rule ---------------------------------------------------


def replay_demo(
    run: Path,
    target: float = 0.995,
    confidence: float = 0.95,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Each routed set of a demo run (`demo --out RUN`), routed again by each rule with the model
    that opened it: that model's held-out wafers (its card), its scores of the set's wafers (from
    the run's wafer store, predicted again here), and the true labels (RUN/truth.csv). Writes
    RUN/promise-replay.json and .md; the served rule's engineer count should equal the run's
    routing (audit wafers aside), which the table shows beside it."""
    state = json.loads((run / "demo-state.json").read_text())
    project = int(state["project"])
    with (run / "truth.csv").open(newline="") as handle:
        truth = {int(r["wafer_id"]): r["failure_type"] for r in csv.DictReader(handle)}
    device = pick_device("cpu")
    models = ModelStore.for_project(run / "models", project, device)
    store = WaferStore.for_project(run / "models", project)
    sets: list[dict[str, Any]] = []
    for routing in store.routings():
        if not routing.decided:
            continue
        classifier = load_version(models.path_of(routing.model_version), device)
        card = classifier.card
        if card.validation is None:
            continue
        measure = Measure(card.validation.measure)
        stored = store.read_set(routing.set_number, card.failure_types)
        codes = encode_wafers(stored.maps, card.image_size)
        label = f"set {routing.set_number}: {routing.model_version}"
        probs = wafer_probabilities(classifier, codes, measure, progress=label)
        scores = uncertainty(probs, measure)
        guess = np.asarray(card.failure_types)[mean_over_views(probs)[0].argmax(1)]
        right = guess == np.asarray([truth[int(w)] for w in stored.maps.source_row])
        val_scores = np.asarray(card.validation.scores, dtype=np.float64)
        val_right = np.asarray(card.validation.correct, dtype=np.bool_)
        row: dict[str, Any] = {
            "set": routing.set_number,
            "model_version": routing.model_version,
            "wafers": len(stored),
            "held_out_wafers": int(val_scores.size),
            "model_accuracy": float(right.mean()),
            "served_engineer": routing.engineer - len(routing.audit),
            "rules": {},
        }
        for name, cut in rule_cuts(val_scores, val_right, scores, target, confidence).items():
            auto = scores <= cut
            wrong = int((auto & ~right).sum())
            row["rules"][name] = {
                "engineer": int((~auto).sum()),
                "engineer_share": float((~auto).mean()),
                "wrong_auto": wrong,
                "accuracy": 1.0 - wrong / len(stored),
                "met": 1.0 - wrong / len(stored) >= target,
            }
        log(f"{label}: " + ", ".join(f"{n} {r['engineer']:,}" for n, r in row["rules"].items()))
        sets.append(row)
    results = {"target_accuracy": target, "confidence": confidence, "sets": sets}
    atomic_write_text(run / "promise-replay.json", json.dumps(json_safe(results), indent=2))
    atomic_write_text(run / "promise-replay.md", replay_markdown(results))
    return results


def replay_markdown(results: dict[str, Any]) -> str:
    names = ("promise", "promise-union", "expected")
    lines = [
        f"Each set routed again by each rule at {100 * results['target_accuracy']:g}% "
        f"(promise at {100 * results['confidence']:g}%), with the model that opened it; "
        "engineer labels without the audit wafers.",
        "",
        "| set | wafers | model accuracy | served: engineer | "
        + " | ".join(f"{n}: engineer (share), wrong auto, accuracy" for n in names)
        + " |",
        "|---:|---:|---:|---:|" + "---|" * len(names),
    ]
    for s in results["sets"]:
        cells = [
            f"{r['engineer']:,} ({100 * r['engineer_share']:.2f}%), {r['wrong_auto']}, "
            f"{100 * r['accuracy']:.2f}%{'' if r['met'] else ' (missed)'}"
            for r in (s["rules"][n] for n in names)
        ]
        lines.append(
            f"| {s['set']} | {s['wafers']:,} | {100 * s['model_accuracy']:.2f}% | "
            f"{s['served_engineer']:,} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"
