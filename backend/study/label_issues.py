"""WM-811K's own label errors, found by confident learning on out-of-sample probabilities.

`python -m backend label-issues [--subsample F] --out DIR`: the labelled wafers are split into
`--folds` stratified folds; a model trained on the other folds predicts each fold, so every
wafer's probabilities come from a model that never saw its label. cleanlab's confident learning
(`cleanlab.filter.find_label_issues`) then names the wafers whose given label the
probabilities contradict, ranked most likely mislabelled first. Written to DIR:

- `label_issues.csv`: source, wafer_id, given_label, suggested_label, confidence (the
  out-of-sample probability of the suggested label), given_probability, rank;
- `sheets/<failure type>.png`: a contact sheet per given label of its most likely mislabels;
- `summary.json` and `results.md`: counts per given label and per (given, suggested) pair;
- `folds/fold-<k>.npz`: each fold's probabilities (a run that stops is resumed from these).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO, StringIO
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from cleanlab.filter import find_label_issues
from sklearn.model_selection import StratifiedKFold

from backend.classifier import WaferClassifier, build_network
from backend.encoding import encode_wafers
from backend.files import atomic_write_bytes, atomic_write_text
from backend.label_config import LabelConfig
from backend.model_card import ModelCard
from backend.splits import stratified_sample
from backend.study.simulate import Study
from backend.training import TrainConfig, logit_adjustment, train_network
from backend.wafer_sets import WM811K_SOURCE
from backend.wafers import WaferMaps


@dataclass(frozen=True)
class LabelIssueConfig:
    """How the out-of-sample probabilities are made (the study's best recipe by default)."""

    subsample: float = 1.0
    folds: int = 4
    backbone: str = "wafercnn"
    image_size: int = 48
    epochs: int = 10
    batch_size: int = 64
    seed: int = 0
    device: str = "cpu"
    #: Wafers a contact sheet shows.
    per_sheet: int = 48

    def key(self) -> str:
        """What a fold's saved probabilities depend on (a changed setting recomputes them)."""
        fields = dataclasses.asdict(self) | {"per_sheet": None}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def out_of_sample_probabilities(
    codes: npt.NDArray[np.uint8],
    classes: npt.NDArray[np.int64],
    failure_types: tuple[str, ...],
    config: LabelIssueConfig,
    folds_dir: Path,
    log: Callable[[str], None],
) -> npt.NDArray[np.float64]:
    """Each wafer's probabilities from a model trained on the other folds (stratified)."""
    n_classes = len(failure_types)
    probs = np.full((len(codes), n_classes), np.nan, dtype=np.float64)
    folds = StratifiedKFold(n_splits=config.folds, shuffle=True, random_state=config.seed)
    device = torch.device(config.device)
    folds_dir.mkdir(parents=True, exist_ok=True)
    for k, (train, held) in enumerate(folds.split(np.zeros(len(classes)), classes)):
        saved = folds_dir / f"fold-{k}.npz"
        if saved.is_file():
            with np.load(saved) as kept:
                if str(kept["key"]) == config.key() and np.array_equal(kept["held"], held):
                    probs[held] = kept["probs"]
                    log(f"fold {k + 1}/{config.folds}: taken from {saved}")
                    continue
        started = time.perf_counter()
        seed = config.seed * 100 + k
        network = build_network(config.backbone, n_classes, seed)
        train_config = TrainConfig(epochs=config.epochs, batch_size=config.batch_size, seed=seed)
        train_network(
            network,
            codes[train],
            classes[train],
            n_classes,
            train_config,
            device,
            progress=f"fold {k + 1}/{config.folds}",
        )
        card = ModelCard(
            version=f"fold-{k}",
            failure_types=failure_types,
            image_size=config.image_size,
            backbone=config.backbone,
            logit_adjustment=tuple(
                logit_adjustment(classes[train], n_classes, train_config.balance)
            ),
        )
        probs[held] = WaferClassifier(network, card, device).predict_proba(codes[held])
        with saved.open("wb") as handle:
            np.savez(handle, key=np.array(config.key()), held=held, probs=probs[held])
        log(
            f"fold {k + 1}/{config.folds}: {len(train):,} wafers trained, {len(held):,} "
            f"predicted in {time.perf_counter() - started:.0f} s"
        )
    return probs


def ranked_issues(
    classes: npt.NDArray[np.int64], probs: npt.NDArray[np.float64]
) -> npt.NDArray[np.intp]:
    """Indices of the wafers whose given label the probabilities contradict (confident
    learning), most likely mislabelled first (lowest probability of the given label)."""
    found = find_label_issues(
        labels=classes, pred_probs=probs, return_indices_ranked_by="self_confidence"
    )
    return np.asarray(found, dtype=np.intp)


def write_issue_table(
    path: Path,
    wafers: WaferMaps,
    issues: npt.NDArray[np.intp],
    probs: npt.NDArray[np.float64],
    failure_types: tuple[str, ...],
) -> None:
    """`label_issues.csv`, one row per suspect wafer, most likely mislabelled first."""
    rows = []
    for rank, i in enumerate(issues.tolist(), start=1):
        given = int(wafers.labels[i])
        suggested = int(probs[i].argmax())
        rows.append(
            {
                "source": WM811K_SOURCE,
                "wafer_id": int(wafers.source_row[i]),
                "given_label": failure_types[given],
                "suggested_label": failure_types[suggested],
                "confidence": round(float(probs[i, suggested]), 6),
                "given_probability": round(float(probs[i, given]), 6),
                "rank": rank,
            }
        )
    fields = [
        "source",
        "wafer_id",
        "given_label",
        "suggested_label",
        "confidence",
        "given_probability",
        "rank",
    ]
    text = StringIO()
    writer = csv.DictWriter(text, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, text.getvalue())


def draw_sheet(
    path: Path,
    wafers: WaferMaps,
    shown: list[int],
    titles: list[str],
    heading: str,
    cols: int,
    cell_height: float = 1.8,
) -> Path:
    """One contact sheet PNG (written atomically): the die maps of `shown` (indices into
    `wafers`) in a grid of `cols` columns, each with its title, under `heading`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    colours = ListedColormap(["#ffffff", "#9ecae1", "#d62728"])  # off wafer, good, failing
    rows = max(1, -(-len(shown) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.6, rows * cell_height), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i, title in zip(axes.ravel(), shown, titles, strict=False):
        ax.imshow(wafers.die_map(i), cmap=colours, vmin=0, vmax=2, interpolation="nearest")
        ax.set_title(title, fontsize=7)
    fig.suptitle(heading, fontsize=9)
    fig.tight_layout()
    buffer = BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def contact_sheets(
    folder: Path,
    wafers: WaferMaps,
    issues: npt.NDArray[np.intp],
    probs: npt.NDArray[np.float64],
    failure_types: tuple[str, ...],
    per_sheet: int,
) -> list[Path]:
    """One PNG per given failure type: its most likely mislabels, each titled with the
    suggested type and its probability."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for given, name in enumerate(failure_types):
        mine = [i for i in issues.tolist() if int(wafers.labels[i]) == given][:per_sheet]
        if not mine:
            continue
        titles = []
        for i in mine:
            suggested = int(probs[i].argmax())
            titles.append(
                f"#{int(wafers.source_row[i])}\n{failure_types[suggested]} "
                f"{probs[i, suggested]:.2f}"
            )
        heading = f"Labelled {name}; the model suggests (probability)"
        cols = min(8, len(mine))
        written.append(draw_sheet(folder / f"{name}.png", wafers, mine, titles, heading, cols))
    return written


def run_label_issues(
    wafers: WaferMaps,
    labels: LabelConfig,
    config: LabelIssueConfig,
    out: Path,
    log: Callable[[str], None] = print,
    auto_errors: dict[str, list[int]] | None = None,
) -> dict[str, Any]:
    """The whole run (see the module docstring); returns the summary it writes."""
    labelled = np.flatnonzero(wafers.labels >= 0)
    rng = np.random.default_rng(config.seed)
    if config.subsample < 1.0:
        chosen = labelled[stratified_sample(wafers.labels[labelled], config.subsample, rng)]
    else:
        chosen = labelled
    sample = wafers.subset(np.sort(chosen))
    classes = sample.labels.astype(np.int64)
    log(f"label issues: {len(sample):,} labelled wafers, {config.folds} folds")
    codes = encode_wafers(sample, config.image_size)
    probs = out_of_sample_probabilities(
        codes, classes, labels.failure_types, config, out / "folds", log
    )
    return report_label_issues(
        sample, classes, probs, labels.failure_types, out, config.per_sheet,
        {"config": dataclasses.asdict(config)}, auto_errors,
    )  # fmt: skip


def report_label_issues(
    sample: WaferMaps,
    classes: npt.NDArray[np.int64],
    probs: npt.NDArray[np.float64],
    names: tuple[str, ...],
    out: Path,
    per_sheet: int,
    about: dict[str, Any],
    auto_errors: dict[str, list[int]] | None = None,
) -> dict[str, Any]:
    """Confident learning on out-of-sample `probs` of `sample`'s given `classes`: the CSV, the
    contact sheets, summary.json and results.md in `out`. With `auto_errors` (a demo run's
    wrong auto labels by wafer id, per set), how many of them are suspect labels, and a sheet of
    them (`sheets/auto-errors.png`)."""
    issues = ranked_issues(classes, probs)
    write_issue_table(out / "label_issues.csv", sample, issues, probs, names)
    sheets = contact_sheets(out / "sheets", sample, issues, probs, names, per_sheet)
    per_given = Counter(names[int(classes[i])] for i in issues)
    pairs = Counter(f"{names[int(classes[i])]} -> {names[int(probs[i].argmax())]}" for i in issues)
    accuracy = float((probs.argmax(axis=1) == classes).mean())
    summary: dict[str, Any] = {
        **about,
        "wafers": len(sample),
        "out_of_sample_accuracy": accuracy,
        "issues": len(issues),
        "issue_share": len(issues) / len(sample) if len(sample) else 0.0,
        "per_given_label": {n: per_given.get(n, 0) for n in names},
        "labelled_per_type": {n: int((classes == k).sum()) for k, n in enumerate(names)},
        "pairs": dict(pairs.most_common()),
        "sheets": [str(p.relative_to(out)) for p in sheets],
    }
    if auto_errors is not None:
        summary["auto_errors"] = auto_error_counts(sample, issues, auto_errors)
        wrong = np.flatnonzero(np.isin(sample.source_row, sorted(_ids(auto_errors))))
        suspect = set(issues.tolist())
        order = sorted(wrong.tolist(), key=lambda i: (i not in suspect, -probs[i].max()))
        sheet = error_sheet(
            out / "sheets" / "auto-errors.png", sample, order, suspect, probs, names
        )
        summary["sheets"].append(str(sheet.relative_to(out)))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    atomic_write_text(out / "results.md", results_markdown(summary))
    return summary


def _ids(auto_errors: dict[str, list[int]]) -> set[int]:
    return {int(w) for ids in auto_errors.values() for w in ids}


def auto_error_counts(
    sample: WaferMaps, issues: npt.NDArray[np.intp], auto_errors: dict[str, list[int]]
) -> dict[str, Any]:
    """Per set and in all: the wrong auto labels, those with out-of-sample probabilities here
    (`covered`), and those among the suspect labels."""
    suspect = {int(sample.source_row[i]) for i in issues.tolist()}
    covered = {int(w) for w in sample.source_row.tolist()}
    counts: dict[str, Any] = {}
    for name, ids in [*auto_errors.items(), ("all", sorted(_ids(auto_errors)))]:
        wanted = {int(w) for w in ids}
        counts[name] = {
            "wrong_auto": len(wanted),
            "covered": len(wanted & covered),
            "suspect": len(wanted & suspect),
        }
    return counts


def error_sheet(
    path: Path,
    sample: WaferMaps,
    order: list[int],
    suspect: set[int],
    probs: npt.NDArray[np.float64],
    names: tuple[str, ...],
) -> Path:
    """One contact sheet of the given wafers: given label, the out-of-sample model's type and
    probability, and "suspect" where confident learning names the given label."""
    titles = []
    for i in order:
        guess = int(probs[i].argmax())
        titles.append(
            f"#{int(sample.source_row[i])}{' suspect' if i in suspect else ''}\n"
            f"{names[int(sample.labels[i])]} / {names[guess]} {probs[i, guess]:.2f}"
        )
    heading = "Wrong auto labels: given label / the out-of-sample model's type"
    return draw_sheet(path, sample, order, titles, heading, cols=10, cell_height=1.9)


def run_label_issues_on_study(
    study: Study,
    labels: LabelConfig,
    out: Path,
    auto_errors: dict[str, list[int]] | None = None,
    per_sheet: int = 48,
) -> dict[str, Any]:
    """Confident learning with one out-of-sample model instead of folds: the study's initial
    model on every later wafer (it never saw their labels), as `promise-check --pool` or
    `routing-study` kept it (DIR/routing-study/evidence-reject-option-*.npz). Covers the
    wafers after the initial set (90% of them at the study's 10% start), in seconds."""
    found = sorted((study.out / "routing-study").glob("evidence-reject-option-*.npz"))
    if not found:
        raise ValueError(
            f"{study.out}: no kept predictions of the initial model on the later wafers; run "
            "`promise-check --pool` or `routing-study` on it first"
        )
    with np.load(found[0]) as data:
        logits = data["logits"][0].astype(np.float64)
        true = data["true"].astype(np.int64)
    members = study.split.rest()
    sample = study.wafers.subset(members)
    if not np.array_equal(sample.labels.astype(np.int64), true):
        raise ValueError(f"{found[0]} does not match the study's later wafers")
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    about = {"probabilities": f"the initial model of {study.out} on its later wafers"}
    return report_label_issues(
        sample, true, probs, labels.failure_types, out, per_sheet, about, auto_errors
    )


def results_markdown(summary: dict[str, Any]) -> str:
    """The counts as Markdown: per given label, then the most common (given -> suggested)."""
    lines = [
        f"{summary['issues']:,} suspect labels among {summary['wafers']:,} labelled wafers "
        f"({summary['issue_share']:.2%}); out-of-sample accuracy "
        f"{summary['out_of_sample_accuracy']:.2%}.",
        "",
        "| given label | labelled | suspect | share |",
        "|---|---:|---:|---:|",
    ]
    for name, count in summary["per_given_label"].items():
        total = summary["labelled_per_type"][name]
        share = count / total if total else 0.0
        lines.append(f"| {name} | {total:,} | {count:,} | {share:.2%} |")
    lines += ["", "| given -> suggested | wafers |", "|---|---:|"]
    for pair, count in list(summary["pairs"].items())[:15]:
        lines.append(f"| {pair} | {count:,} |")
    if "auto_errors" in summary:
        lines += [
            "",
            "| wrong auto labels of | wrong | with out-of-sample probabilities | suspect labels |",
            "|---|---:|---:|---:|",
        ]
        for name, c in summary["auto_errors"].items():
            lines.append(f"| {name} | {c['wrong_auto']:,} | {c['covered']:,} | {c['suspect']:,} |")
    return "\n".join(lines) + "\n"
