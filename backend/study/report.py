"""Bookkeeping of a labeling study: per-set outcomes -> the figures people compare. Layer L0.

Labeling accuracy counts engineer labels as correct: accuracy = 1 - (wrong auto labels) / wafers.
The engineer ratio is engineer labels / wafers. Macro-F1 is taken over the defect classes (all
but "none") of the final labels against the true ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from backend.study.metrics import confusion_matrix, macro_f1, per_class_recall

#: The study's published results over its 155,655 wafers (seed-method.md), for reference.
STUDY_REFERENCE: tuple[dict[str, Any], ...] = (
    {
        "name": "study: least confidence (max p < 0.99)",
        "accuracy": 0.9927,
        "engineer_ratio": 0.1125,
    },
    {"name": "study: margin (p1 - p2 <= 0.98)", "accuracy": 0.9934, "engineer_ratio": 0.1168},
    {"name": "study: entropy (H > 0.05)", "accuracy": 0.9957, "engineer_ratio": 0.1374},
)


@dataclass(frozen=True, eq=False)
class SetOutcome:
    """How one set of wafers got its labels under one method."""

    set_number: int
    true: npt.NDArray[np.int64]
    final: npt.NDArray[np.int64]
    engineer: npt.NDArray[np.bool_]

    def __post_init__(self) -> None:
        if not len(self.true) == len(self.final) == len(self.engineer):
            raise ValueError("true labels, final labels and engineer flags differ in length")
        if np.any(self.final[self.engineer] != self.true[self.engineer]):
            raise ValueError("an engineer label differs from the true label")

    @property
    def errors(self) -> int:
        return int(np.count_nonzero(self.final != self.true))


def _figures(total: int, engineer: int, errors: int) -> dict[str, Any]:
    return {
        "total": total,
        "engineer_labels": engineer,
        "auto_labels": total - engineer,
        "errors": errors,
        "accuracy": 1 - errors / total if total else float("nan"),
        "engineer_ratio": engineer / total if total else float("nan"),
    }


def summarize(
    name: str,
    family: str,
    rule: str,
    outcomes: Sequence[SetOutcome],
    failure_types: Sequence[str],
    defect_classes: Sequence[int],
) -> dict[str, Any]:
    """One method's row of results.json: totals, macro-F1, per-class recall and per-set figures."""
    true = np.concatenate([o.true for o in outcomes])
    final = np.concatenate([o.final for o in outcomes])
    engineer = np.concatenate([o.engineer for o in outcomes])
    k = len(failure_types)
    cm = confusion_matrix(true, final, k)
    recall = per_class_recall(cm)
    auto_cm = confusion_matrix(true[~engineer], final[~engineer], k)
    row: dict[str, Any] = {"name": name, "family": family, "rule": rule}
    row |= _figures(len(true), int(engineer.sum()), int(np.count_nonzero(final != true)))
    row["macro_f1"] = macro_f1(cm, defect_classes)
    row["per_class_recall"] = {
        t: (None if np.isnan(r) else float(r)) for t, r in zip(failure_types, recall, strict=True)
    }
    row["auto_label_confusion"] = auto_cm.tolist()
    row["per_set"] = [
        {"set": o.set_number} | _figures(len(o.true), int(o.engineer.sum()), o.errors)
        for o in outcomes
    ]
    return row


def _pct(x: float) -> str:
    return "-" if x != x else f"{100 * x:.2f}%"


def study_markdown(methods: Sequence[dict[str, Any]], failure_types: Sequence[str]) -> str:
    """results.md: the totals table, engineer labels per set, and per-class recall."""
    lines = [
        "| method | rule | wafers | engineer labels | engineer ratio | errors | labeling accuracy"
        " | macro-F1 (8 defects) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m in methods:
        lines.append(
            f"| {m['name']} | {m['rule']} | {m['total']:,} | {m['engineer_labels']:,} | "
            f"{_pct(m['engineer_ratio'])} | {m['errors']:,} | {_pct(m['accuracy'])} | "
            f"{m['macro_f1']:.4f} |"
        )
    lines += ["", "Published by the study (155,655 wafers, not re-run):", ""]
    lines += [
        f"- {r['name']}: accuracy {_pct(r['accuracy'])} at {_pct(r['engineer_ratio'])} engineer labels"
        for r in STUDY_REFERENCE
    ]
    n_sets = max((len(m["per_set"]) for m in methods), default=0)
    lines += ["", "Engineer labels (errors) per set:", ""]
    lines.append("| method | " + " | ".join(f"set {i + 1}" for i in range(n_sets)) + " |")
    lines.append("|---|" + "---:|" * n_sets)
    for m in methods:
        cells = [f"{s['engineer_labels']} ({s['errors']})" for s in m["per_set"]]
        lines.append(f"| {m['name']} | " + " | ".join(cells) + " |")
    lines += ["", "Recall of the final labels per failure type:", ""]
    lines.append("| method | " + " | ".join(failure_types) + " |")
    lines.append("|---|" + "---:|" * len(failure_types))
    for m in methods:
        cells = [
            "-" if m["per_class_recall"][t] is None else f"{m['per_class_recall'][t]:.3f}"
            for t in failure_types
        ]
        lines.append(f"| {m['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
