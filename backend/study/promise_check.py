"""How often a set misses the promised accuracy: the per-set promise against the expected-accuracy
cut, on a study run's own predictions. `python -m backend promise-check DIR`.

Layer L2 (study). For each set of the calibrated loop in DIR it takes the model outputs the
routing study keeps (`backend.study.routing_study.collect_evidence`: the set's wafers and the
held-out wafers its cut is calibrated on, with their true labels), then `resamples` times draws
a set of `set_size` wafers from the set and a held-out sample of the same size as the kept one
(both with replacement), routes the drawn set by margin with each rule, and counts the drawn
sets whose labeling accuracy (engineer labels right, auto labels as the model said) falls below
the target. It writes DIR/promise-check/results.json and results.md.

The rules compared:
- ``expected``: `backend.calibration.calibrate_scores` at 90% per threshold (the older served
  rule, WAFER_PROMISE_CONFIDENCE=0), which bounds the expected auto-label error;
- ``promise``: `backend.calibration.promise_cut` at `confidence` (the served rule), which keeps
  the drawn set's own accuracy at the target with that probability.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from backend.calibration import calibrate_scores, promise_cut
from backend.files import atomic_write_text
from backend.study.routing_methods import Evidence
from backend.study.routing_study import collect_evidence
from backend.study.simulate import Study, json_safe
from backend.study.temperature import softmax
from backend.uncertainty import Measure, uncertainty


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
    """Draw `resamples` sets (spread over the evidence's sets) and route each by both rules."""
    rng = np.random.default_rng(seed)
    outcomes: dict[str, list[tuple[bool, float, float]]] = {"expected": [], "promise": []}
    prepared = []
    for e in evidence:
        scores, guess = _margin_scores(e.logits)
        val_scores, val_guess = _margin_scores(e.val_logits)
        prepared.append((scores, guess == e.true, val_scores, val_guess == e.val_true))
    for i in range(resamples):
        scores, right, val_scores, val_right = prepared[i % len(prepared)]
        n = set_size or len(scores)
        pick = rng.integers(0, len(scores), n)
        held = rng.integers(0, len(val_scores), len(val_scores))
        s, ok, vs, vok = scores[pick], right[pick], val_scores[held], val_right[held]
        cuts = {
            "expected": calibrate_scores(vs, vok, target, 0.9, s).threshold,
            "promise": promise_cut(vs, vok, s, target, confidence).threshold,
        }
        for name, cut in cuts.items():
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
) -> dict[str, Any]:
    """Collect the evidence a routing study keeps (one view), check both rules, write results."""
    # The initial set's random hold-out when the run's models never trained on it (bounded
    # retraining), as the backend calibrates on random person-labelled wafers; else the phase's.
    hold_out = "initial" if study.config.retrain == "bounded" else "phase"
    evidence = collect_evidence(study, views=1, log=log, reject_option_views=0, hold_out=hold_out)
    sets = [e for name, e in sorted(evidence.items()) if name.startswith("set")]
    if not sets:
        raise ValueError(f"{study.out} has no calibrated-loop sets with kept held-out wafers")
    figures = check_promise(sets, target, confidence, resamples, set_size)
    results = {
        "target_accuracy": target,
        "confidence": confidence,
        "resamples": resamples,
        "set_size": set_size or "as the study's sets",
        "study_sets": len(sets),
        "hold_out": hold_out,
        "held_out_wafers": [len(e.val_true) for e in sets],
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
        f"(set size: {results['set_size']}; {results['study_sets']} study sets)",
        "",
        "| rule | sets below target | share | promised at most | engineer share | mean accuracy | worst |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    promised = {"expected": "(none per set)", "promise": f"{100 * (1 - confidence):.1f}%"}
    for name, f in results["rules"].items():
        lines.append(
            f"| {name} | {f['missed']} | {100 * f['miss_rate']:.1f}% | {promised[name]} | "
            f"{100 * f['engineer_ratio']:.2f}% | {100 * f['accuracy']:.3f}% | "
            f"{100 * f['worst_accuracy']:.3f}% |"
        )
    return "\n".join(lines) + "\n"
