"""Which classifier settings buy accuracy per CPU-second, on the study's initial 10% (prints a table).

    nice -n 19 .venv/bin/python -m backend.study.classifier_sweep --out runs/sweep.json \
        [--only r18-32-e10 r18-48-e6 ...] [--list] [--threads 2] [--test-wafers 17295]

Every configuration trains on the training part of the study's initial set (the first phase of
`python -m backend simulate` at --subsample 1.0 --seed 0: 17,295 wafers, ~15,570 train after
the 10% stratified hold-out) and is scored on
- the held-out 10% of the initial set (~1,730 wafers: what `simulate` reports as validation
  accuracy; macro-F1 here is noisy, Near-full has 1-2 wafers), and
- set 1 (17,295 wafers the initial model predicts next in the study): the steadier figure;
  also with test-time augmentation (TTA: probabilities averaged over the 8 symmetries of each
  wafer, 8 times the prediction cost, no training cost).
Reported per configuration: accuracy and macro-F1 on both, wall and CPU seconds of training,
samples seen. Results go to --out as JSON after each configuration; a rerun skips the ones
already there (delete the file, or pass --again, to redo them).
Wall seconds depend on what else runs on the machine; samples and CPU seconds do less.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backend.classifier import WaferClassifier, build_network, pick_device, save_version
from backend.encoding import encode_wafers
from backend.files import atomic_write_text
from backend.label_config import DEFAULT_LABEL_CONFIG, parse_label_config
from backend.model_card import ModelCard
from backend.settings import Settings
from backend.sources import load_wafers
from backend.study.metrics import confusion_matrix, macro_f1
from backend.study.simulate import Study, StudyConfig
from backend.training import TrainConfig, logit_adjustment, train_network


@dataclass(frozen=True)
class Candidate:
    """One classifier setting to try."""

    name: str
    backbone: str = "resnet18"
    image_size: int = 32
    epochs: int = 5
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    balance: str = "sqrt"
    augment: bool = True
    label_smoothing: float = 0.0
    mixup: float = 0.0

    def train_config(self, seed: int) -> TrainConfig:
        return TrainConfig(
            epochs=self.epochs,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            weight_decay=self.weight_decay,
            balance=self.balance,
            augment=self.augment,
            seed=seed,
            label_smoothing=self.label_smoothing,
            mixup=self.mixup,
        )


#: The grid, in the order it runs (cheapest informative ones first).
CANDIDATES = (
    Candidate("r18-32-e5"),
    Candidate("r18-32-e10", epochs=10),
    Candidate("r18-32-e10-lr3", epochs=10, learning_rate=3e-3),
    Candidate("r18-48-e6", image_size=48, epochs=6),
    Candidate("r18-32-e10-ls", epochs=10, label_smoothing=0.1),
    Candidate("r18-32-e10-mix", epochs=10, mixup=0.2),
    Candidate("r18-32-e10-inv", epochs=10, balance="inverse"),
    Candidate("r18-32-e10-none", epochs=10, balance="none"),
    Candidate("r18-32-e20", epochs=20),
    Candidate("r18-64-e3", image_size=64, epochs=3),
    Candidate("r18-48-e12", image_size=48, epochs=12),
    Candidate("r18-32-e10-b128", epochs=10, batch_size=128, learning_rate=2e-3),
    Candidate("r18-32-e10-noaug", epochs=10, augment=False),
    Candidate("cnn-32-e10", backbone="wafercnn", epochs=10),
    Candidate("cnn-48-e10", backbone="wafercnn", image_size=48, epochs=10),
    Candidate("cnn-32-e20", backbone="wafercnn", epochs=20),
    Candidate("cnn-48-e20", backbone="wafercnn", image_size=48, epochs=20),
    Candidate("cnn-64-e10", backbone="wafercnn", image_size=64, epochs=10),
    Candidate("cnn-48-e20-lr3", backbone="wafercnn", image_size=48, epochs=20, learning_rate=3e-3),
    Candidate("cnn-48-e20-ls", backbone="wafercnn", image_size=48, epochs=20, label_smoothing=0.1),
    Candidate("cnn-48-e20-mix", backbone="wafercnn", image_size=48, epochs=20, mixup=0.2),
    Candidate("cnn-48-e20-inv", backbone="wafercnn", image_size=48, epochs=20, balance="inverse"),
    Candidate("cnn-32-e10-none", backbone="wafercnn", epochs=10, balance="none"),
    Candidate("cnn-32-e10-ls", backbone="wafercnn", epochs=10, label_smoothing=0.1),
    Candidate("cnn-32-e10-mix", backbone="wafercnn", epochs=10, mixup=0.2),
    Candidate("cnn-32-e10-lr3", backbone="wafercnn", epochs=10, learning_rate=3e-3),
    Candidate("r18-32-e5-none", balance="none"),
    Candidate("cnn-48-e10-none", backbone="wafercnn", image_size=48, epochs=10, balance="none"),
    Candidate("cnn-32-e20-none", backbone="wafercnn", epochs=20, balance="none"),
    Candidate("cnn-48-e20-none", backbone="wafercnn", image_size=48, epochs=20, balance="none"),
    Candidate("cnn-32-e40-none", backbone="wafercnn", epochs=40, balance="none"),
    Candidate(
        "cnn-48-e20-none-ls",
        backbone="wafercnn",
        image_size=48,
        epochs=20,
        balance="none",
        label_smoothing=0.1,
    ),
    Candidate(
        "cnn-48-e20-none-mix",
        backbone="wafercnn",
        image_size=48,
        epochs=20,
        balance="none",
        mixup=0.2,
    ),
)


def symmetric_proba(model: WaferClassifier, codes: np.ndarray) -> np.ndarray:
    """Test-time augmentation: probabilities averaged over the 8 symmetries of each wafer."""
    total = np.zeros((len(codes), len(model.card.failure_types)))
    for k in range(8):
        turned = np.rot90(codes, k % 4, axes=(1, 2))
        if k >= 4:
            turned = turned[:, :, ::-1]
        total += model.predict_proba(np.ascontiguousarray(turned))
    return total / 8


def scores(probs: np.ndarray, true: np.ndarray, n_classes: int) -> dict[str, float]:
    cm = confusion_matrix(true, probs.argmax(1), n_classes)
    return {"accuracy": float(np.trace(cm) / cm.sum()), "macro_f1": macro_f1(cm)}


def run_candidate(
    c: Candidate,
    study: Study,
    train: np.ndarray,
    val: np.ndarray,
    test: np.ndarray,
    seed: int,
    tta: bool,
    models: Path | None,
) -> dict[str, Any]:
    wafers, n_classes = study.wafers, study.n_classes
    codes = {
        part: encode_wafers(wafers.subset(idx), c.image_size)
        for part, idx in (("train", train), ("val", val), ("test", test))
    }
    true = study.true
    config = c.train_config(seed)
    network = build_network(c.backbone, n_classes, seed)
    report = train_network(
        network, codes["train"], true[train], n_classes, config, study.device, progress=c.name
    )
    card = ModelCard(
        version=c.name,
        failure_types=study.labels.failure_types,
        image_size=c.image_size,
        backbone=c.backbone,
        logit_adjustment=tuple(logit_adjustment(true[train], n_classes, c.balance)),
    )
    model = WaferClassifier(network, card, study.device)
    start = time.perf_counter()
    val_scores = scores(model.predict_proba(codes["val"]), true[val], n_classes)
    test_scores = (
        scores(model.predict_proba(codes["test"]), true[test], n_classes) if len(test) else {}
    )
    score_seconds = time.perf_counter() - start
    tta_val: dict[str, float] = {}
    tta_test: dict[str, float] = {}
    if tta:
        tta_val = scores(symmetric_proba(model, codes["val"]), true[val], n_classes)
        if len(test):
            tta_test = scores(symmetric_proba(model, codes["test"]), true[test], n_classes)
    if models is not None:
        save_version(model, models / f"{c.name}.pt")
    return {
        "candidate": dataclasses.asdict(c),
        "train_wafers": len(train),
        "samples": report.samples,
        "train_seconds": report.seconds,
        "train_cpu_seconds": report.cpu_seconds,
        "samples_per_second": report.samples_per_second,
        "loss_per_epoch": list(report.loss_per_epoch),
        "val_wafers": len(val),
        "val_accuracy": val_scores["accuracy"],
        "val_macro_f1": val_scores["macro_f1"],
        "set1_wafers": len(test),
        "set1_accuracy": test_scores.get("accuracy"),
        "set1_macro_f1": test_scores.get("macro_f1"),
        "score_seconds": score_seconds,
        "tta_val_accuracy": tta_val.get("accuracy"),
        "tta_val_macro_f1": tta_val.get("macro_f1"),
        "tta_set1_accuracy": tta_test.get("accuracy"),
        "tta_set1_macro_f1": tta_test.get("macro_f1"),
        "threads": torch.get_num_threads(),
    }


HEADER = (
    f"{'config':18} {'val acc':>8} {'val F1':>7} {'set1 acc':>8} {'set1 F1':>7} "
    f"{'train s':>8} {'cpu s':>8} {'samples':>9} {'TTA set1 acc':>12} {'TTA F1':>6}"
)


def row(r: dict[str, Any]) -> str:
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.2f}%"

    def f1(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    return (
        f"{r['candidate']['name']:18} {pct(r['val_accuracy']):>8} {f1(r['val_macro_f1']):>7} "
        f"{pct(r['set1_accuracy']):>8} {f1(r['set1_macro_f1']):>7} "
        f"{r['train_seconds']:8.0f} {r['train_cpu_seconds']:8.0f} {r['samples']:9,} "
        f"{pct(r.get('tta_set1_accuracy')):>12} {f1(r.get('tta_set1_macro_f1')):>6}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/classifier_sweep.json"))
    parser.add_argument("--only", nargs="+", help="run only these configurations (--list)")
    parser.add_argument("--list", action="store_true", help="print the configurations and exit")
    parser.add_argument("--again", action="store_true", help="redo configurations in --out")
    parser.add_argument("--threads", type=int, help="torch threads (default: every core)")
    parser.add_argument(
        "--test-wafers",
        type=int,
        default=None,
        help="score on this many random wafers of set 1 (default all; 0 = none)",
    )
    parser.add_argument("--seed", type=int, default=0, help="the study's seed (0)")
    parser.add_argument(
        "--tta", action="store_true", help="also score with test-time augmentation (8x predict)"
    )
    parser.add_argument("--save-models", type=Path, help="keep each trained model here")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    by_name = {c.name: c for c in CANDIDATES}
    if args.list:
        for c in CANDIDATES:
            print(c)
        return 0
    unknown = set(args.only or ()) - set(by_name)
    if unknown:
        parser.error(f"unknown configurations {sorted(unknown)}; see --list")
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    settings = Settings.from_env(os.environ)
    labels = parse_label_config(DEFAULT_LABEL_CONFIG.read_text())
    wafers, _ = load_wafers(settings.data_path, labels.failure_types, settings.cache_dir)
    config = StudyConfig(seed=args.seed, device=args.device)
    study = Study(config, wafers, labels, args.out.parent, log=lambda s: None)
    study.device = pick_device(args.device)
    train, val = study.initial_train_val()
    test = study.split.sets[0]
    if args.test_wafers is not None:
        rng = np.random.default_rng(args.seed)
        test = np.sort(rng.permutation(test)[: args.test_wafers])
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    print(
        f"initial set: {len(train):,} train + {len(val):,} held out; set 1: {len(test):,} "
        f"scored; {torch.get_num_threads()} threads",
        flush=True,
    )
    print(HEADER, flush=True)
    for name in args.only or [c.name for c in CANDIDATES]:
        if name in results and not args.again:
            print(row(results[name]) + "  (from --out)", flush=True)
            continue
        results[name] = run_candidate(
            by_name[name], study, train, val, test, args.seed, args.tta, args.save_models
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(results, indent=2))
        print(row(results[name]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
