"""PNG plots of a labeling study (matplotlib, no display needed). Layer L1."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from backend.study.report import STUDY_REFERENCE

#: Marker per kind of method: the study's measures, ours, and the baselines.
FAMILY_MARKERS = {"study measure": "o", "ours": "*", "baseline": "s"}


def accuracy_vs_engineer_ratio(methods: Sequence[dict[str, Any]], path: Path) -> Path:
    """Every method as a point: labeling accuracy against the share of engineer labels."""
    fig = Figure(figsize=(8, 5.5))
    ax = fig.subplots()
    colours = matplotlib.colormaps["tab20"]
    for i, m in enumerate(methods):
        ax.scatter(
            100 * m["engineer_ratio"],
            100 * m["accuracy"],
            s=90 if m["family"] == "ours" else 55,
            marker=FAMILY_MARKERS.get(m["family"], "o"),
            color=colours(i % 20),
            label=m["name"],
        )
    _published_points(ax, legend=True)
    ax.set_xlabel("engineer labels (% of wafers)")
    ax.set_ylabel("labeling accuracy (%)")
    ax.set_title("Labeling accuracy against engineer effort (up and left is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def _published_points(ax: Any, legend: bool) -> None:
    """The study's published results as open circles, in the legend or written beside them."""
    for r in STUDY_REFERENCE:
        x, y = 100 * r["engineer_ratio"], 100 * r["accuracy"]
        label = r["name"] + " (published)" if legend else None
        ax.scatter(x, y, s=60, facecolors="none", edgecolors="black", label=label)
        if not legend:
            ax.annotate(r["name"], (x, y), fontsize=6)


def engineer_labels_per_set(methods: Sequence[dict[str, Any]], path: Path) -> Path:
    """Engineer labels needed in each set: falling lines mean the retrained model learns."""
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    for m in methods:
        sets = [s["set"] for s in m["per_set"]]
        ax.plot(sets, [s["engineer_labels"] for s in m["per_set"]], marker="o", label=m["name"])
    ax.set_xlabel("wafer set")
    ax.set_ylabel("engineer labels")
    ax.set_title("Engineer labels per set")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def auto_label_confusion(
    methods: Sequence[dict[str, Any]], failure_types: Sequence[str], path: Path
) -> Path:
    """True failure type against auto label, for the wafers each method labelled itself."""
    shown = [m for m in methods if m["auto_labels"] > 0]
    cols = max(1, min(3, len(shown)))
    rows = max(1, -(-len(shown) // cols))
    fig = Figure(figsize=(5.2 * cols, 4.8 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for ax, m in zip(axes.flat, shown, strict=False):
        ax.set_visible(True)
        cm = np.asarray(m["auto_label_confusion"])
        ax.imshow(np.log1p(cm), cmap="Blues")
        for (i, j), v in np.ndenumerate(cm):
            if v:
                ax.text(
                    j,
                    i,
                    str(v),
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="red" if i != j else "black",
                )
        ax.set_xticks(range(len(failure_types)), failure_types, rotation=60, fontsize=7)
        ax.set_yticks(range(len(failure_types)), failure_types, fontsize=7)
        ax.set_xlabel("auto label")
        ax.set_ylabel("true failure type")
        ax.set_title(
            f"{m['name']}\n{m['auto_labels']:,} auto labels, {m['errors']} wrong", fontsize=8
        )
    return _save(fig, path)


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def routing_curves(methods: Sequence[dict[str, Any]], path: Path) -> Path:
    """Each routing method's best-cut curve (labeling accuracy against engineer labels) over the
    loop's sets, its calibrated point on it, and the study's published points."""
    fig = Figure(figsize=(9, 6))
    ax = fig.subplots()
    colours = matplotlib.colormaps["tab10"]
    for i, m in enumerate(x for x in methods if x.get("scope") == "loop"):
        c = colours(i % 10)
        curve = m["curve"]
        ax.plot(
            100 * np.asarray(curve["engineer_ratio"]),
            100 * np.asarray(curve["accuracy"]),
            color=c,
            lw=1.2,
            label=m["name"],
        )
        ax.scatter(100 * m["engineer_ratio"], 100 * m["accuracy"], color=c, marker="*", s=110)
    _published_points(ax, legend=False)
    ax.set_xlim(0, 30)
    ax.set_ylim(96.5, 100.05)
    ax.axhline(99.57, color="grey", ls=":", lw=0.8)
    ax.set_xlabel("engineer labels (% of wafers)")
    ax.set_ylabel("labeling accuracy (%)")
    ax.set_title("Routing methods: best cut (lines) and calibrated at the target (stars)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)
