"""Which levers make the first model stronger: a pretrained start, input size, longer training,
class-aware drawing, a committee, another backbone (prints a table; issue 16 item 3).

    # once, where the WM-811K file is: the study's initial set and set 1, as a small pack
    python -m backend.study.levers pack --out runs/levers-pack
    # then, on this machine or one with a GPU (the pack and the unlabelled codes travel)
    python -m backend.study.levers run --pack runs/levers-pack --out runs/levers.json \\
        [--pretrain-epochs 4] [--only cnn48-e20 cnn48-e20-pre ...] [--device cuda]
    # a committee of any members already run, scored from their kept probabilities
    python -m backend.study.levers committee --pack runs/levers-pack --out runs/levers.json \\
        --name e40-x2 cnn48-e40-x3-seed0 cnn48-e40-x3-seed1

Every lever trains on the training part of the study's initial set (the first phase of
`python -m backend simulate` at --subsample 1.0 --seed 0: ~15,570 wafers after the stratified 10%
hold-out) and is scored on set 1 (17,295 wafers the initial model predicts next):
accuracy, macro-F1, and the engineer share at 99.57% labeling accuracy, i.e. the fewest wafers
that must go to engineers, least sure first (margin of the served probabilities), for set 1 to
reach the published method's best accuracy. That share is the best any cut on the score can do
(chosen with set 1's truth, `routing_methods.engineer_share_for`): it ranks levers, it is not a
calibrated figure. Training seconds are wall and process CPU seconds on the device used.

Each member's probabilities of set 1's 8 symmetric drawings are kept beside --out (in
`<out stem>-probs/`), so the table also scores every drawing averaged (test-time augmentation,
routed by margin and by the served eight-views measure) and, for a committee, routing by its
members' disagreement alone (query by committee); `committee` scores any mix of kept members.

The pretrained start comes from `backend.pretraining` on the 638,507 wafers without a label
(never a labelled wafer): from the data file, or on a machine without it from `--unlabelled`, the
die codes at 48 x 48 packed four to a byte and xz-compressed (`pack` writes them with
`--unlabelled`). Results go to --out after each lever; a rerun skips the ones already there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import lzma
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from backend.classifier import WaferClassifier, build_network, pick_device
from backend.encoding import encode_wafers
from backend.files import atomic_write_text
from backend.label_config import DEFAULT_LABEL_CONFIG, parse_label_config
from backend.model_card import ModelCard
from backend.pretraining import PretrainConfig, pretrain
from backend.sources.arrays import load_npz, save_npz
from backend.study.metrics import confusion_matrix, macro_f1
from backend.study.routing_methods import engineer_share_for
from backend.training import TrainConfig, logit_adjustment, train_network
from backend.uncertainty import Measure, uncertainty, views_for
from backend.wafers import WaferMaps

#: The published method's best labeling accuracy, at which the engineer share is read.
TARGET_ACCURACY = 0.9957
#: Parts of the pack: training wafers of the initial set, its held-out 10%, set 1.
TRAIN, HELD_OUT, SET_1 = 0, 1, 2
PRETRAIN_SIZE = 48


@dataclass(frozen=True)
class Lever:
    """One first-model recipe to try."""

    name: str
    backbone: str = "wafercnn"
    image_size: int = 48
    epochs: int = 20
    balance: str = "none"
    pretrained: bool = False
    #: More than one seed: a committee, its probabilities averaged.
    seeds: tuple[int, ...] = (0,)
    batch_size: int = 64
    learning_rate: float = 1e-3
    #: Self-training: a teacher of this recipe labels the unlabelled wafers it is this sure of
    #: (top probability), and a student trains on those plus the labelled ones (0 = off).
    pseudo_label_confidence: float = 0.0
    #: Student's samples, in passes over the labelled training wafers.
    student_passes: int = 60


#: In the order they run: the ones the issues ask about first.
LEVERS = (
    Lever("cnn48-e20"),
    Lever("cnn48-e20-pre", pretrained=True),
    Lever("cnn48-e40", epochs=40),
    Lever("cnn48-e40-pre", epochs=40, pretrained=True),
    Lever("cnn48-e20-pre-lr3", pretrained=True, learning_rate=3e-4),
    Lever("cnn48-e40-s1", epochs=40, seeds=(1,)),
    Lever("cnn48-e40-pre-s1", epochs=40, pretrained=True, seeds=(1,)),
    Lever("cnn48-e80", epochs=80),
    Lever("cnn48-e80-pre", epochs=80, pretrained=True),
    Lever("cnn48-e20-sqrt", balance="sqrt"),
    Lever("cnn48-self-p99", pseudo_label_confidence=0.99),
    Lever("cnn48-self-p95", pseudo_label_confidence=0.95),
    Lever("cnn64-e20", image_size=64),
    Lever("cnn96-e20", image_size=96),
    Lever("cnn48-e20-x3", seeds=(0, 1, 2)),
    Lever("cnn48-e20-pre-x3", pretrained=True, seeds=(0, 1, 2)),
    Lever("cnn48-e40-x3", epochs=40, seeds=(0, 1, 2)),
    Lever("r50-48-e20", backbone="resnet50"),
    Lever("r50-64-e5", backbone="resnet50", image_size=64, epochs=5),
    Lever("r50-224-e5", backbone="resnet50", image_size=224, epochs=5),
)


def pack_study(out: Path, data: Path, unlabelled: bool) -> None:
    """Write the study's initial set and set 1 (die maps, labels, parts) to `out`, and with
    `unlabelled` the unlabelled wafers' codes at 48 x 48 (packed, xz)."""
    from backend.settings import Settings
    from backend.sources import load_wafers
    from backend.study.simulate import Study, StudyConfig

    labels = parse_label_config(DEFAULT_LABEL_CONFIG.read_text())
    settings = Settings.from_env(os.environ)
    wafers, _ = load_wafers(data, labels.failure_types, settings.cache_dir, keep_unlabelled=True)
    labelled = wafers.subset(np.flatnonzero(wafers.labels >= 0))
    study = Study(StudyConfig(seed=0), labelled, labels, out, log=lambda s: None)
    train, held_out = study.initial_train_val()
    set_1 = study.split.sets[0]
    order = np.concatenate([train, held_out, set_1])
    parts = np.repeat([TRAIN, HELD_OUT, SET_1], [len(train), len(held_out), len(set_1)])
    out.mkdir(parents=True, exist_ok=True)
    save_npz(labelled.subset(order), out / "labelled.npz")
    np.save(out / "parts.npy", parts.astype(np.int8))
    print(f"{out}: {len(train):,} train, {len(held_out):,} held out, {len(set_1):,} set 1")
    if unlabelled:
        codes = encode_wafers(wafers.subset(np.flatnonzero(wafers.labels < 0)), PRETRAIN_SIZE)
        with lzma.open(out / "unlabelled48.xz", "wb", preset=6) as f:
            f.write(pack_codes(codes).tobytes())
        print(f"{out / 'unlabelled48.xz'}: {len(codes):,} wafers without a label")


def pack_codes(codes: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """(n, S, S) die codes 0..2 -> (n, S, S / 4), four codes a byte (S a multiple of 4)."""
    return (
        codes[..., 0::4]
        | (codes[..., 1::4] << 2)
        | (codes[..., 2::4] << 4)
        | (codes[..., 3::4] << 6)
    ).astype(np.uint8)


def unpack_codes(packed: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    n, rows, quarter = packed.shape
    codes = np.empty((n, rows, 4 * quarter), dtype=np.uint8)
    for k in range(4):
        codes[..., k::4] = (packed >> (2 * k)) & 3
    return codes


def read_unlabelled(path: Path, size: int = PRETRAIN_SIZE) -> npt.NDArray[np.uint8]:
    with lzma.open(path, "rb") as f:
        raw = np.frombuffer(f.read(), dtype=np.uint8)
    return unpack_codes(raw.reshape(-1, size, size // 4))


def lever_scores(
    probs: npt.NDArray[np.float64], true: npt.NDArray[np.integer], n_classes: int
) -> dict[str, float]:
    predicted = probs.argmax(1)
    cm = confusion_matrix(true, predicted, n_classes)
    unsure = uncertainty(probs, Measure.MARGIN)
    return {
        "accuracy": float(np.trace(cm) / cm.sum()),
        "macro_f1": macro_f1(cm),
        "engineer_share": engineer_share_for(unsure, predicted, true, TARGET_ACCURACY),
    }


def committee_scores(
    members: npt.NDArray[np.floating], true: npt.NDArray[np.integer], n_classes: int
) -> dict[str, Any]:
    """Set-1 scores of a committee's probabilities ``(members, views, wafers, classes)``.

    ``set1_*``: the first drawing, members averaged (what the served model sees today).
    ``set1_views8_*``: every drawing and member averaged (test-time augmentation); its
    ``engineer_share_agreement`` routes by the served eight-views measure over all members'
    drawings (low mean margin or members and drawings that disagree go first). With more than
    one member, ``set1_members`` holds each member's own first-drawing scores and
    ``set1_disagreement_engineer_share`` routes by query by committee alone: the mean KL
    divergence of each member from the consensus (McCallum and Nigam 1998)."""
    probs = members.astype(np.float64)
    probs /= probs.sum(axis=-1, keepdims=True)  # float16 storage rounds the rows a little
    first = probs[:, 0]
    consensus = first.mean(0)
    out: dict[str, Any] = {
        f"set1_{k}": v for k, v in lever_scores(consensus, true, n_classes).items()
    }
    all_views = probs.mean((0, 1))
    out |= {f"set1_views8_{k}": v for k, v in lever_scores(all_views, true, n_classes).items()}
    drawings = probs.reshape(-1, *probs.shape[2:])
    out["set1_views8_engineer_share_agreement"] = engineer_share_for(
        uncertainty(drawings, Measure.EIGHT_VIEWS), all_views.argmax(1), true, TARGET_ACCURACY
    )
    if len(probs) > 1:
        out["set1_members"] = [lever_scores(m, true, n_classes) for m in first]
        log_first, log_consensus = (np.log(np.clip(x, 1e-12, None)) for x in (first, consensus))
        kl = (first * (log_first - log_consensus)).sum(2).mean(0)
        out["set1_disagreement_engineer_share"] = engineer_share_for(
            kl, consensus.argmax(1), true, TARGET_ACCURACY
        )
    return out


class Bench:
    """The pack, encoded lazily per input size, and the results file."""

    def __init__(
        self, pack: Path, device: torch.device, out: Path, limit: int | None = None
    ) -> None:
        #: The failure types, read once from the label config.
        self.classes = parse_label_config(DEFAULT_LABEL_CONFIG.read_text()).failure_types
        self.wafers: WaferMaps
        self.wafers, _ = load_npz(pack / "labelled.npz", self.classes, progress=False)
        self.parts = np.load(pack / "parts.npy")
        if limit is not None:  # the first `limit` wafers of each part (a quick look)
            keep = np.concatenate([np.flatnonzero(self.parts == p)[:limit] for p in (0, 1, 2)])
            self.wafers, self.parts = self.wafers.subset(keep), self.parts[keep]
        self.true = self.wafers.labels.astype(np.int64)
        self.device = device
        self.out = out
        self.results: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
        self._codes: dict[int, npt.NDArray[np.uint8]] = {}

    def codes(self, size: int) -> npt.NDArray[np.uint8]:
        if size not in self._codes:
            self._codes = {size: encode_wafers(self.wafers, size)}  # one size in memory at a time
        return self._codes[size]

    def run(
        self,
        lever: Lever,
        weights: Path | None,
        unlabelled: npt.NDArray[np.uint8] | None = None,
    ) -> dict[str, Any]:
        n_classes = len(self.classes)
        codes = self.codes(lever.image_size)
        train = np.flatnonzero(self.parts == TRAIN)
        test = np.flatnonzero(self.parts == SET_1)
        seconds = cpu_seconds = 0.0
        if lever.pseudo_label_confidence > 0:
            if unlabelled is None or lever.image_size != PRETRAIN_SIZE:
                raise ValueError(f"{lever.name} needs the unlabelled codes at {PRETRAIN_SIZE}")
            return self.self_train(lever, codes, train, test, unlabelled)
        true = self.true[train]
        members = []
        drawings = views_for(Measure.EIGHT_VIEWS)  # all 8: test-time augmentation
        for seed in lever.seeds:
            start = weights if lever.pretrained else None
            model, s, c = self._train(lever, codes[train], true, lever.epochs, true, seed, start)
            seconds += s
            cpu_seconds += c
            views = model.predict_views(codes[test], drawings).astype(np.float16)
            self.save_member(lever.name, seed, views)
            members.append(views)
        return {
            "lever": dataclasses.asdict(lever),
            "train_wafers": len(train),
            "set1_wafers": len(test),
            "train_seconds": seconds,
            "train_cpu_seconds": cpu_seconds,
            "device": str(self.device),
            **committee_scores(np.stack(members), self.true[test], n_classes),
        }

    @property
    def probs_folder(self) -> Path:
        """Where each committee member's set-1 probabilities are kept."""
        return self.out.with_name(self.out.stem + "-probs")

    def committee(self, name: str, members: list[str]) -> dict[str, Any]:
        """Score a committee of members already run (``<lever>-seed<k>``, as kept in
        `probs_folder`): training seconds are each member's share of its lever's seconds."""
        missing = [m for m in members if not (self.probs_folder / f"{m}.npy").is_file()]
        if missing:
            kept = sorted(f.stem for f in self.probs_folder.glob("*.npy"))
            raise ValueError(f"no probabilities for {missing}; kept: {', '.join(kept) or 'none'}")
        stacked = np.stack([np.load(self.probs_folder / f"{m}.npy") for m in members])
        test = np.flatnonzero(self.parts == SET_1)
        seconds = cpu_seconds = 0.0
        for member in members:
            lever = member.rpartition("-seed")[0]
            if lever not in self.results:
                raise ValueError(f"{lever} has not finished in {self.out} (its seconds are needed)")
            run = self.results[lever]
            seconds += run["train_seconds"] / len(run["lever"]["seeds"])
            cpu_seconds += run["train_cpu_seconds"] / len(run["lever"]["seeds"])
        return {
            "lever": {"name": name, "members": members},
            "train_wafers": int(np.sum(self.parts == TRAIN)),
            "set1_wafers": len(test),
            "train_seconds": seconds,
            "train_cpu_seconds": cpu_seconds,
            "device": "",
            **committee_scores(stacked, self.true[test], len(self.classes)),
        }

    def save_member(self, lever: str, seed: int, views: npt.NDArray[np.float16]) -> None:
        """One member's set-1 probabilities (views, wafers, classes) beside --out, so committees
        of any size can be scored again without training (the reported figures are scored on
        these very float16 values)."""
        folder = self.probs_folder
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / f"{lever}-seed{seed}.npy", views)

    def _train(
        self,
        lever: Lever,
        codes: npt.NDArray[np.uint8],
        labels: npt.NDArray[np.int64],
        epochs: int,
        adjust_from: npt.NDArray[np.int64],
        seed: int,
        weights: Path | None = None,
    ) -> tuple[WaferClassifier, float, float]:
        """A model of `lever`'s recipe trained on `codes`; its wall and CPU seconds."""
        n_classes = len(self.classes)
        network = build_network(lever.backbone, n_classes, seed, weights)
        config = TrainConfig(
            epochs=epochs,
            batch_size=lever.batch_size,
            learning_rate=lever.learning_rate,
            balance=lever.balance,
            seed=seed,
        )
        report = train_network(network, codes, labels, n_classes, config, self.device, lever.name)
        card = ModelCard(
            version=lever.name,
            failure_types=self.classes,
            image_size=lever.image_size,
            backbone=lever.backbone,
            logit_adjustment=tuple(logit_adjustment(adjust_from, n_classes, lever.balance)),
        )
        return WaferClassifier(network, card, self.device), report.seconds, report.cpu_seconds

    def self_train(
        self,
        lever: Lever,
        codes: npt.NDArray[np.uint8],
        train: npt.NDArray[np.intp],
        test: npt.NDArray[np.intp],
        unlabelled: npt.NDArray[np.uint8],
    ) -> dict[str, Any]:
        """Teacher on the labelled wafers; it labels the unlabelled ones it is sure of; a student
        trains on both (as many samples as `student_passes` passes over the labelled wafers)."""
        n_classes = len(self.classes)
        true = self.true[train]
        teacher, seconds, cpu = self._train(
            lever, codes[train], true, lever.epochs, true, lever.seeds[0]
        )
        start, cpu_start = time.perf_counter(), time.process_time()
        guess = teacher.predict_proba(unlabelled, batch_size=1024)
        sure = np.flatnonzero(guess.max(1) >= lever.pseudo_label_confidence)
        pseudo = guess[sure].argmax(1).astype(np.int64)
        seconds += time.perf_counter() - start
        cpu += time.process_time() - cpu_start
        both = np.concatenate([codes[train], unlabelled[sure]])
        both_labels = np.concatenate([true, pseudo])
        epochs = max(1, round(lever.student_passes * len(train) / len(both)))
        student, s_seconds, s_cpu = self._train(
            lever, both, both_labels, epochs, true, lever.seeds[0]
        )
        probs = student.predict_proba(codes[test])
        return {
            "lever": dataclasses.asdict(lever),
            "train_wafers": len(train),
            "pseudo_labelled": len(sure),
            "pseudo_label_counts": np.bincount(pseudo, minlength=n_classes).tolist(),
            "student_epochs": epochs,
            "set1_wafers": len(test),
            "train_seconds": seconds + s_seconds,
            "train_cpu_seconds": cpu + s_cpu,
            "device": str(self.device),
            **{f"set1_{k}": v for k, v in lever_scores(probs, self.true[test], n_classes).items()},
        }

    def save(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out, json.dumps(self.results, indent=2))


def affordable(
    codes: npt.NDArray[np.uint8],
    config: PretrainConfig,
    device: torch.device,
    seconds: float,
    scratch: Path,
    probe_steps: int = 60,
) -> PretrainConfig:
    """`config` with as many passes (at most its own) as fit in `seconds`, timed on a probe."""
    probe_out = scratch / "pretraining-probe.pt"
    probe = pretrain(
        codes[: probe_steps * config.batch_size],
        "wafercnn",
        dataclasses.replace(config, epochs=1),
        device,
        probe_out,
        progress=False,
    )
    probe_out.unlink(missing_ok=True)
    per_pass = probe.seconds / probe.steps_run * config.steps_per_epoch(len(codes))
    passes = max(1, min(config.epochs, int(seconds // per_pass)))
    print(f"probe: {per_pass:.0f} s a pass over {len(codes):,} wafers -> {passes} passes")
    return dataclasses.replace(config, epochs=passes)


LEVER_HEADER = (
    f"{'lever':18} {'set1 acc':>8} {'F1':>6} {'engineer @99.57%':>16} "
    f"{'8 views acc':>11} {'F1':>6} {'engineer':>8} {'agree':>7} {'QBC':>7} "
    f"{'train s':>8} {'CPU s':>8}"
)


def _share(r: dict[str, Any], key: str) -> str:
    return f"{100 * r[key]:6.2f}%" if key in r else f"{'-':>7}"


def lever_row(r: dict[str, Any]) -> str:
    """One lever's line: one drawing, then 8 drawings (accuracy, F1, engineer share by margin and
    by the eight-views agreement), query by committee; blanks where a run lacks the figure."""
    views = (
        f"{100 * r['set1_views8_accuracy']:10.2f}% {r['set1_views8_macro_f1']:6.3f} "
        f"{100 * r['set1_views8_engineer_share']:7.2f}%"
        if "set1_views8_accuracy" in r
        else f"{'-':>11} {'-':>6} {'-':>8}"
    )
    return (
        f"{r['lever']['name']:18} {100 * r['set1_accuracy']:7.2f}% {r['set1_macro_f1']:6.3f} "
        f"{100 * r['set1_engineer_share']:15.2f}% {views} "
        f"{_share(r, 'set1_views8_engineer_share_agreement')} "
        f"{_share(r, 'set1_disagreement_engineer_share')} "
        f"{r['train_seconds']:8.0f} {r['train_cpu_seconds']:8.0f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="write the initial set and set 1 as a small pack")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data", type=Path, help="the WM-811K file (env WAFER_DATA)")
    p.add_argument("--unlabelled", action="store_true", help="also the unlabelled codes at 48")
    r = sub.add_parser("run", help="train and score the levers")
    r.add_argument("--pack", type=Path, required=True)
    r.add_argument("--out", type=Path, required=True, help="results JSON")
    r.add_argument("--only", nargs="+", help="run only these levers")
    r.add_argument("--unlabelled", type=Path, help="packed unlabelled codes (pack --unlabelled)")
    r.add_argument("--weights", type=Path, help="pretrained weights (made here if missing)")
    r.add_argument("--pretrain-epochs", type=int, default=4, help="at most this many passes")
    r.add_argument(
        "--pretrain-seconds", type=float, help="fewer passes if a timed probe says they overrun"
    )
    r.add_argument("--pretrain-batch", type=int, default=512)
    r.add_argument("--budget-seconds", type=float, help="start no lever after this many seconds")
    r.add_argument("--device", default="cpu")
    r.add_argument("--limit", type=int, help="only the first N wafers of each part (a quick look)")
    c = sub.add_parser("committee", help="score a committee of members already run")
    c.add_argument("--pack", type=Path, required=True)
    c.add_argument("--out", type=Path, required=True, help="results JSON of the members' runs")
    c.add_argument("--name", required=True, help="the committee's row in --out")
    c.add_argument("members", nargs="+", help="<lever>-seed<k>, e.g. cnn48-e40-x3-seed1")
    args = parser.parse_args(argv)
    if args.command == "committee":
        bench = Bench(args.pack, torch.device("cpu"), args.out)
        try:
            bench.results[args.name] = bench.committee(args.name, args.members)
        except ValueError as exc:
            parser.error(f"committee {args.name}: {exc}")
        bench.save()
        print(LEVER_HEADER)
        print(lever_row(bench.results[args.name]))
        return 0
    if args.command == "pack":
        from backend.settings import Settings

        data = args.data or Settings.from_env(os.environ).data_path
        pack_study(args.out, data, args.unlabelled)
        return 0
    start = time.perf_counter()
    by_name = {lever.name: lever for lever in LEVERS}
    names = args.only or list(by_name)
    unknown = set(names) - set(by_name)
    if unknown:
        parser.error(f"unknown levers {sorted(unknown)}; choose from {', '.join(by_name)}")
    device = pick_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    bench = Bench(args.pack, device, args.out, args.limit)
    weights = args.weights or args.out.with_name("pretrained-wafercnn48.pt")
    unlabelled = None
    if any(by_name[n].pseudo_label_confidence > 0 for n in names):
        if args.unlabelled is None:
            parser.error("self-training levers need --unlabelled")
        unlabelled = read_unlabelled(args.unlabelled)
    if any(by_name[n].pretrained for n in names) and not weights.exists():
        if args.unlabelled is None:
            parser.error(f"{weights} is missing: pass --unlabelled to pretrain it")
        codes = unlabelled if unlabelled is not None else read_unlabelled(args.unlabelled)
        config = PretrainConfig(epochs=args.pretrain_epochs, batch_size=args.pretrain_batch)
        if args.pretrain_seconds:
            config = affordable(codes, config, device, args.pretrain_seconds, weights.parent)
        print(
            f"pretraining on {len(codes):,} wafers without a label, {config.epochs} passes",
            flush=True,
        )
        report = pretrain(codes, "wafercnn", config, device, weights)
        bench.results["_pretraining"] = {
            "wafers": report.wafers,
            "steps": report.steps,
            "seconds": report.seconds,
            "cpu_seconds": report.cpu_seconds,
            "wafers_per_second": report.wafers_per_second,
            "loss_per_epoch": list(report.loss_per_epoch),
            "device": str(device),
        }
        bench.save()
        del codes
    print(LEVER_HEADER, flush=True)
    for name in names:
        if name in bench.results:
            print(lever_row(bench.results[name]) + "  (from --out)", flush=True)
            continue
        if args.budget_seconds and time.perf_counter() - start > args.budget_seconds:
            print(f"{name}: not started, over --budget-seconds", flush=True)
            continue
        try:
            bench.results[name] = bench.run(by_name[name], weights, unlabelled)
        except (RuntimeError, ValueError) as exc:  # one lever failing leaves the others
            print(f"{name}: failed: {exc}", file=sys.stderr, flush=True)
            continue
        bench.save()
        print(lever_row(bench.results[name]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
