"""Command-line interface: `python -m backend <command>`. Layer L3.

Commands:
  convert        read a wafer-map file once into the cache and print what was found
  simulate       run the uncertainty-labeling study over the wafer sets (resumable)
  compare-sizes  accuracy and speed of the model input sizes on one split (benchmark)
  settings       print the settings the environment gives

Label Studio (LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY, see README.md):
  setup-project  create and wire a project: labeling config, ML backend, webhook, views
  import-sets    import the initial labelled set and the wafer sets of a wafer-map file
  import-wafers  append new (unlabelled) wafers as the next sets, or a labelled history as set 0
  train          train a first model version offline on labelled history and serve it
  status         per set: wafers, auto labels, engineer labels, waiting; the model versions
  retrain        ask the worker to retrain now (as Start Training in Label Studio does)
  reconcile      repair the loop after a crash or a lost webhook, and say what was repaired
  demo           the whole system on this machine; --simulate-engineers runs the loop
  load-test      bounded load on a backend started on loopback: latency, wafers/s, RSS
  bench          wafers/s of every way to a prediction and of training, with ratios
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from backend.allocator import keep_freed_memory
from backend.label_config import LabelConfig, parse_label_config
from backend.settings import BACKBONES, DEVICES, ENVIRONMENT, FIRST_MODEL_EPOCHS, Settings
from backend.sources import load_wafers
from backend.sources.cache import LoadReport
from backend.splits import SetOrder
from backend.uncertainty import Measure
from backend.wafers import WaferMaps

#: Settings whose values `python -m backend settings` never prints.
SECRET_SETTINGS = frozenset({"LABEL_STUDIO_API_KEY", "BASIC_AUTH_PASS", "WAFER_WEBHOOK_SECRET"})


def shown_value(name: str, value: str) -> str:
    """A setting's value as `settings` prints it: secrets and passwords in URLs as '***'."""
    if name in SECRET_SETTINGS and value:
        return "***"
    parts = urllib.parse.urlsplit(value) if "://" in value else None
    if parts is not None and parts.password:
        host = parts.hostname or ""
        user = parts.username or ""
        netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return value


def _settings(args: argparse.Namespace) -> Settings:
    settings = Settings.from_env(os.environ)
    overrides = {
        "data_path": args.data,
        "cache_dir": getattr(args, "cache_dir", None),
        "image_size": getattr(args, "image_size", None),
        "backbone": getattr(args, "backbone", None),
        "device": getattr(args, "device", None),
        "weights_path": getattr(args, "weights", None),
        "model_dir": getattr(args, "model_dir", None),
    }
    return dataclasses.replace(settings, **{k: v for k, v in overrides.items() if v is not None})


def _label_config(settings: Settings) -> LabelConfig:
    return parse_label_config(settings.label_config_path.read_text())


def _load(settings: Settings, labels: LabelConfig) -> tuple[WaferMaps, LoadReport]:
    wafers, report = load_wafers(settings.data_path, labels.failure_types, settings.cache_dir)
    print(report.summary(), file=sys.stderr)
    return wafers, report


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, help="LSWMD.pkl, LSWMD.zip or .npz (env WAFER_DATA)")
    p.add_argument("--cache-dir", type=Path, help="converted-data cache (env WAFER_CACHE_DIR)")


def _add_model_flags(p: argparse.ArgumentParser, epochs: int = 5) -> None:
    p.add_argument("--image-size", type=int, help="model input S x S (env WAFER_IMAGE_SIZE, 48)")
    p.add_argument("--backbone", choices=BACKBONES, help="env WAFER_BACKBONE (wafercnn)")
    p.add_argument("--device", choices=DEVICES, help="env WAFER_DEVICE (auto)")
    p.add_argument("--weights", type=Path, help="local weights file for the backbone")
    p.add_argument(
        "--epochs", type=int, default=epochs, help=f"epochs per training phase ({epochs})"
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m backend",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    convert = sub.add_parser("convert", help="read a wafer-map file once into the cache")
    _add_data_flags(convert)

    sim = sub.add_parser("simulate", help="run the uncertainty-labeling study")
    _add_data_flags(sim)
    _add_model_flags(sim)
    sim.add_argument(
        "--subsample",
        type=float,
        default=1.0,
        help="stratified fraction of the labelled wafers to use (1.0 = all 172,950)",
    )
    sim.add_argument(
        "--sets", type=int, default=9, help="number of wafer sets after the initial set"
    )
    sim.add_argument("--initial-fraction", type=float, default=0.1)
    sim.add_argument(
        "--set-order",
        choices=[o.value for o in SetOrder],
        default="random",
        help="random sets (seeded) or consecutive blocks in dataset order",
    )
    sim.add_argument(
        "--retrain",
        choices=["scratch", "warm", "bounded"],
        default="scratch",
        help="new model every set (the study), continue the previous one on everything, or "
        "continue it on the new set plus a class-balanced replay within --phase-budget",
    )
    sim.add_argument(
        "--phase-budget",
        type=int,
        help="--retrain bounded: samples per retraining (default: epochs x new wafers)",
    )
    sim.add_argument(
        "--replay-per-new-wafer",
        type=float,
        default=1.0,
        help="--retrain bounded: earlier wafers replayed per new wafer (1.0)",
    )
    sim.add_argument(
        "--calibrate-on",
        choices=("phase", "initial"),
        default="phase",
        help="held-out wafers of the calibrated cut: the phase's person labels (phase) or the "
        "initial set's random share (initial; --retrain bounded only)",
    )
    sim.add_argument(
        "--retrain-lr-scale",
        type=float,
        default=1.0,
        help="--retrain bounded: peak learning rate as a share of a fresh training's (1.0)",
    )
    sim.add_argument(
        "--loops",
        default="least-confidence,margin,entropy,calibrated,auto-labeling",
        help="comma-separated methods that run their own retraining loop",
    )
    sim.add_argument(
        "--target-accuracy",
        type=float,
        default=0.995,
        help="labeling accuracy the calibrated method must reach (0.995)",
    )
    sim.add_argument("--calibration-measure", choices=[m.value for m in Measure], default="margin")
    sim.add_argument(
        "--confidence",
        type=float,
        default=0.9,
        help="confidence of the calibrated accuracy bound (0.9; 0.5 = point estimate)",
    )
    sim.add_argument("--validation-fraction", type=float, default=0.1)
    sim.add_argument(
        "--balance",
        choices=["sqrt", "inverse", "none"],
        default="none",
        help="class balance of training draws: none (default, the real mix), sqrt or inverse",
    )
    sim.add_argument("--no-augment", action="store_true", help="no rotations/mirrorings")
    sim.add_argument("--out", type=Path, default=Path("runs/study"), help="run directory")

    sizes = sub.add_parser("compare-sizes", help="accuracy and speed per model input size")
    _add_data_flags(sizes)
    _add_model_flags(sizes)
    sizes.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    sizes.add_argument("--subsample", type=float, default=0.02)
    sizes.add_argument("--test-fraction", type=float, default=0.3)

    settings = sub.add_parser("settings", help="print the settings from the environment")
    settings.add_argument("--data", type=Path, help=argparse.SUPPRESS)

    wire = sub.add_parser("setup-project", help="create and wire a Label Studio project")
    wire.add_argument("--title", default="Wafer maps", help="project title ('Wafer maps')")
    wire.add_argument(
        "--backend-url", help="where Label Studio reaches the backend (env WAFER_BACKEND_URL)"
    )
    wire.set_defaults(data=None)

    imp = sub.add_parser("import-sets", help="import the initial set and the wafer sets")
    _add_data_flags(imp)
    _add_plan_flags(imp)
    imp.add_argument("--project", default="Wafer maps", help="project title or id")
    imp.add_argument(
        "--only", type=int, nargs="+", help="import only these set numbers (0 = initial set)"
    )
    imp.add_argument(
        "--truth",
        type=Path,
        default=Path("runs/truth.csv"),
        help="where the true failure types of the imported wafers are written (for simulations)",
    )

    wafers = sub.add_parser(
        "import-wafers", help="append new wafers as the next sets (or a history as set 0)"
    )
    _add_data_flags(wafers)
    wafers.add_argument("--project", default="Wafer maps", help="project title or id")
    cut = wafers.add_mutually_exclusive_group(required=True)
    cut.add_argument("--per-set", type=int, help="wafers a set, whole lots only")
    cut.add_argument("--lots-per-set", type=int, help="lots a set")
    cut.add_argument(
        "--initial", action="store_true", help="the file's labelled wafers as set 0, with labels"
    )
    wafers.add_argument(
        "--rows",
        choices=["unlabelled", "labelled"],
        default="unlabelled",
        help="which wafers become new sets: those without a failure type (default) or, for "
        "a test with known answers, the labelled ones (their labels are not imported)",
    )
    wafers.add_argument("--max-sets", type=int, help="import only the first N new sets")
    wafers.add_argument(
        "--subsample", type=float, default=1.0, help="stratified share for --initial (1.0)"
    )
    wafers.add_argument("--seed", type=int, default=0)
    wafers.add_argument("--source", help="data.source of the wafers (default: the file's stem)")
    for command in (imp, wafers):
        command.add_argument(
            "--pictures",
            type=Path,
            help="write the wafer pictures as PNG files into this folder (under Label Studio's "
            "LOCAL_FILES_DOCUMENT_ROOT, served by its local-files storage) instead of data URLs "
            "inside the tasks",
        )

    train = sub.add_parser("train", help="train a first model offline and serve it")
    _add_data_flags(train)
    _add_model_flags(train, epochs=FIRST_MODEL_EPOCHS)
    train.add_argument("--project", default="Wafer maps", help="project title or id")
    train.add_argument(
        "--from-project",
        action="store_true",
        help="train on the project's set 0 in Label Studio instead of the --data file",
    )
    train.add_argument(
        "--subsample", type=float, default=1.0, help="stratified share of the wafers (1.0)"
    )
    train.add_argument("--model-dir", type=Path, help="where versions are stored (env MODEL_DIR)")
    train.add_argument("--source", help="data.source of the --data wafers (default: its stem)")

    pre = sub.add_parser(
        "pretrain", help="learn a starting point for the backbone from wafers without labels"
    )
    _add_data_flags(pre)
    pre.add_argument("--out", type=Path, required=True, help="weights file to write (.pt)")
    pre.add_argument(
        "--subsample", type=float, default=1.0, help="random share of the unlabelled wafers (1.0)"
    )
    pre.add_argument("--epochs", type=int, default=10, help="passes over the wafers (10)")
    pre.add_argument("--batch-size", type=int, default=256, help="wafers per step (256)")
    pre.add_argument("--image-size", type=int, help="model input S x S (env WAFER_IMAGE_SIZE)")
    pre.add_argument("--backbone", choices=BACKBONES, help="env WAFER_BACKBONE")
    pre.add_argument("--device", choices=DEVICES, help="env WAFER_DEVICE (auto)")
    pre.add_argument("--seed", type=int, default=0)

    status = sub.add_parser("status", help="where the labeling stands, per set")
    status.add_argument("--project", default="Wafer maps", help="project title or id")
    status.set_defaults(data=None)

    retrain = sub.add_parser(
        "retrain", help="queue the loop's next step (retrain if a set is done)"
    )
    retrain.add_argument("--project", default="Wafer maps", help="project title or id")
    retrain.set_defaults(data=None)

    reconcile = sub.add_parser(
        "reconcile", help="repair dead jobs, stale locks, unretrained sets, unpredicted wafers"
    )
    reconcile.add_argument("--project", default="Wafer maps", help="project title or id")
    reconcile.set_defaults(data=None)

    demo = sub.add_parser("demo", help="run Redis, Label Studio, the backend and a worker here")
    _add_data_flags(demo)
    _add_plan_flags(demo)
    demo.add_argument("--image-size", type=int, help="model input S x S (env WAFER_IMAGE_SIZE)")
    demo.add_argument("--backbone", choices=BACKBONES, help="env WAFER_BACKBONE (wafercnn)")
    demo.add_argument("--device", choices=DEVICES, help="env WAFER_DEVICE (auto)")
    demo.add_argument("--epochs", type=int, help="epochs per retraining (env WAFER_EPOCHS)")
    demo.add_argument(
        "--simulate-engineers",
        action="store_true",
        help="label each set's uncertain wafers with their true types, run the loop to the end",
    )
    demo.add_argument("--label-studio-port", type=int, default=8080)
    demo.add_argument(
        "--database",
        default="auto",
        help="Label Studio's database: auto (PostgreSQL on 127.0.0.1:5432 when it answers, else "
        "SQLite), sqlite, postgresql, or a postgresql://user:password@host:port/db admin URL",
    )
    demo.add_argument(
        "--out",
        type=Path,
        default=Path("runs/demo"),
        help="demo directory (wiped, unless --resume)",
    )
    demo.add_argument(
        "--resume",
        action="store_true",
        help="carry on with the stopped run in --out (same sizes and seed): its Label Studio, "
        "project, models and finished sets",
    )
    demo.add_argument(
        "--first-model-wafers",
        type=int,
        default=17_295,
        help="labelled history (set 0) the first model is trained on offline, once, cached "
        "(17295: the study's initial 10%%); 0: the worker trains on a --subsample's set 0",
    )
    demo.add_argument("--set-size", type=int, default=2_000, help="wafers per set (2000)")
    demo.add_argument(
        "--engineers",
        type=int,
        default=1,
        help="--simulate-engineers: engineers labelling each queue at once (1)",
    )
    demo.add_argument(
        "--first-model-epochs", type=int, default=FIRST_MODEL_EPOCHS, help=f"({FIRST_MODEL_EPOCHS})"
    )

    load = sub.add_parser("load-test", help="bounded /predict load on a backend on loopback")
    load.add_argument("--clients", type=int, default=20, help="client threads (20)")
    load.add_argument("--batch", type=int, default=100, help="tasks per /predict (100)")
    load.add_argument("--seconds", type=float, default=60.0, help="how long to send (60)")
    load.add_argument("--max-requests", type=int, default=100_000, help="stop after (100000)")
    load.add_argument("--image-size", type=int, default=64, help="model input S x S (64)")
    load.set_defaults(data=None)

    bench = sub.add_parser("bench", help="wafers/s of each way to a prediction; training; ratios")
    _add_data_flags(bench)
    bench.add_argument("--quick", action="store_true", help="a few minutes: fewer wafers")
    bench.add_argument("--json", type=Path, help="also write the figures as JSON here")
    bench.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="where to compute (cpu)"
    )
    routes = sub.add_parser(
        "routing-study",
        help="compare routing methods (temperature, per-type, 8 views, novelty) on a study run",
    )
    routes.add_argument("out", type=Path, help="the study run's directory (simulate --out)")
    _add_data_flags(routes)
    routes.add_argument("--target-accuracy", type=float, default=0.995)
    routes.add_argument("--confidence", type=float, default=0.9)
    routes.add_argument("--views", type=int, choices=(1, 8), default=8, help="drawings per wafer")
    routes.add_argument(
        "--hold-out",
        choices=("initial", "phase"),
        default="initial",
        help="calibrate each cut on the initial set's held-out wafers (random; bounded runs) "
        "or on the phase's own person-labelled hold-out (as the loop did)",
    )
    routes.add_argument(
        "--reject-option-views",
        type=int,
        choices=(0, 1, 8),
        default=1,
        help="drawings per wafer for the initial model on every later wafer (1; 0 = skip)",
    )
    issues = sub.add_parser(
        "label-issues",
        help="WM-811K's own suspect labels: confident learning (cleanlab) on out-of-sample "
        "probabilities; a CSV and contact sheets",
    )
    _add_data_flags(issues)
    issues.add_argument("--out", type=Path, required=True, help="run directory (resumable)")
    issues.add_argument("--subsample", type=float, default=1.0, help="stratified share (1.0)")
    issues.add_argument("--folds", type=int, default=4, help="cross-validation folds (4)")
    issues.add_argument("--epochs", type=int, default=10, help="epochs a fold (10)")
    issues.add_argument("--backbone", choices=BACKBONES, default="wafercnn")
    issues.add_argument("--image-size", type=int, default=48)
    issues.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    issues.add_argument("--seed", type=int, default=0)
    issues.add_argument(
        "--from-study",
        type=Path,
        help="no folds: the out-of-sample probabilities of this study run's initial model on its "
        "later wafers (kept by promise-check --pool or routing-study); seconds instead of hours",
    )
    issues.add_argument(
        "--auto-errors",
        type=Path,
        help="a demo run's report.json: count its wrong auto labels among the suspect labels",
    )
    promise = sub.add_parser(
        "promise-check",
        help="how often drawn sets miss the target: the per-set promise against the expected "
        "accuracy, on a study run",
    )
    promise.add_argument("out", type=Path, help="the study run's directory (simulate --out)")
    _add_data_flags(promise)
    promise.add_argument("--target-accuracy", type=float, default=0.995)
    promise.add_argument("--confidence", type=float, default=0.95)
    promise.add_argument("--resamples", type=int, default=200, help="sets drawn (200)")
    promise.add_argument(
        "--set-size", type=int, help="wafers per drawn set (default: as the study's sets)"
    )
    promise.add_argument(
        "--pool",
        action="store_true",
        help="draw held-out wafers and sets from the initial model's predictions on every later "
        "wafer (disjoint, without replacement) instead of the loop's sets",
    )
    promise.add_argument(
        "--calibration-size", type=int, default=2600, help="--pool: held-out wafers per draw"
    )
    for name, what in (
        (
            "promise-replay",
            "sets routed again by each promise rule with the models that opened them",
        ),
        (
            "view-gate",
            "first set routed by one view, 8 views and 8 views of the unsure wafers only",
        ),
    ):
        on_run = sub.add_parser(name, help=f"a demo run's {what}, against the true labels")
        on_run.add_argument("run", type=Path, help="the demo's directory (demo --out)")
        on_run.add_argument("--target-accuracy", type=float, default=0.995)
        on_run.add_argument("--confidence", type=float, default=0.95)
        on_run.set_defaults(data=None)
    loop = sub.add_parser(
        "bench-loop",
        help="the loop at fab scale on a real Label Studio: import, open a set, status, reads",
    )
    loop.add_argument("--history", type=int, default=0, help="set 0 wafers (0: all but set 1)")
    loop.add_argument("--held-out", type=int, default=17_295, help="set 1 wafers (17295)")
    loop.add_argument("--unlabelled", type=int, default=20_000, help="set 2 wafers (20000)")
    loop.add_argument("--train-wafers", type=int, default=17_295, help="first model's (17295)")
    loop.add_argument("--epochs", type=int, default=2, help="first model's epochs (2)")
    loop.add_argument("--database", default="auto", help="auto | postgresql | sqlite (auto)")
    loop.add_argument("--out", type=Path, default=Path("bench-loop"), help="output folder")
    _add_data_flags(loop)
    return parser


def _add_plan_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--subsample", type=float, default=0.01, help="stratified share of labelled wafers (0.01)"
    )
    p.add_argument("--sets", type=int, default=9, help="wafer sets after the initial set (9)")
    p.add_argument("--initial-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)


def _pretrain(args: argparse.Namespace, settings: Settings, labels: LabelConfig) -> int:
    """`pretrain`: contrastive pretraining on the wafers of --data that carry no label."""
    from backend.classifier import pick_device
    from backend.encoding import encode_wafers
    from backend.pretraining import PretrainConfig, pretrain

    if not 0 < args.subsample <= 1:
        raise ValueError("--subsample must be in (0, 1]")
    wafers, _ = load_wafers(
        settings.data_path, labels.failure_types, settings.cache_dir, keep_unlabelled=True
    )
    unlabelled = np.flatnonzero(wafers.labels < 0)
    if not len(unlabelled):
        raise ValueError(f"{settings.data_path} holds no wafers without a label to pretrain on")
    rng = np.random.default_rng(args.seed)
    keep = max(1, round(args.subsample * len(unlabelled)))
    chosen = np.sort(rng.permutation(unlabelled)[:keep])
    print(
        f"pretraining {settings.backbone} at {settings.image_size} on {len(chosen):,} of "
        f"{len(unlabelled):,} wafers without labels (labelled wafers are never used)",
        file=sys.stderr,
    )
    codes = encode_wafers(wafers.subset(chosen), settings.image_size)
    config = PretrainConfig(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)
    report = pretrain(
        codes,
        settings.backbone,
        config,
        pick_device(settings.device),
        args.out,
        log=lambda line: print(line, file=sys.stderr),
    )
    print(
        f"{report.steps_run:,} steps in {report.seconds:,.0f} s ({report.cpu_seconds:,.0f} CPU-s, "
        f"{report.wafers_per_second:,.0f} wafers/s); loss per pass: "
        + " ".join(f"{x:.3f}" for x in report.loss_per_epoch)
    )
    if report.steps < config.epochs * config.steps_per_epoch(len(codes)):
        return 0
    print(f"wrote {args.out}: start from it with `train --weights {args.out}` or WAFER_WEIGHTS")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted (a study keeps its finished sets: run the same command to resume; a "
            "demo too, with --resume)",
            file=sys.stderr,
        )
        return 130


def _run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if settings.keep_freed_memory:
        keep_freed_memory()
    if args.command == "settings":
        for name, text in ENVIRONMENT.items():
            print(f"{name:18} {shown_value(name, os.environ.get(name, ''))!r:24} {text}")
        print(settings)
        return 0
    labels = _label_config(settings)
    if args.command == "reconcile":
        from backend.cli_reconcile import run_reconcile

        return run_reconcile(args.project, settings)
    if args.command in ("setup-project", "import-sets", "import-wafers", "status", "retrain"):
        from backend.cli_labelstudio import run_label_studio_command

        return run_label_studio_command(args, settings, labels)
    if args.command == "demo":
        from backend.harness.demo import DemoConfig, main_demo

        settings = dataclasses.replace(
            settings, **({"epochs": args.epochs} if args.epochs is not None else {})
        )
        if args.engineers < 1:
            print(f"--engineers must be at least 1, got {args.engineers}", file=sys.stderr)
            return 2
        wafers, _ = _load(settings, labels)
        config = DemoConfig(
            out=args.out,
            subsample=args.subsample,
            initial_fraction=args.initial_fraction,
            sets=args.sets,
            seed=args.seed,
            label_studio_port=args.label_studio_port,
            simulate_engineers=args.simulate_engineers,
            database=args.database,
            first_model_wafers=args.first_model_wafers,
            set_size=args.set_size,
            first_model_epochs=args.first_model_epochs,
            resume=args.resume,
            engineers=args.engineers,
        )
        return main_demo(config, settings, labels, wafers)
    if args.command == "load-test":
        from backend.harness.load_test import LoadPlan, run_load_test

        plan = LoadPlan(args.clients, args.batch, args.seconds, args.max_requests, args.image_size)
        for line in run_load_test(plan, labels).lines(plan):
            print(line)
        return 0
    if args.command == "convert":
        _load(settings, labels)
        return 0
    from backend.training import use_every_core

    use_every_core()
    if args.command == "bench-loop":
        from backend.harness.bench_loop import LoopBenchConfig
        from backend.harness.bench_loop import main as bench_loop

        return bench_loop(
            LoopBenchConfig(
                history=args.history,
                held_out=args.held_out,
                unlabelled=args.unlabelled,
                train_wafers=args.train_wafers,
                epochs=args.epochs,
                database=args.database,
                out=args.out,
            )
        )
    if args.command == "bench":
        return _bench(args, settings, labels)
    if args.command == "routing-study":
        return _routing_study(args, settings, labels)
    if args.command == "promise-check":
        return _promise_check(args, settings, labels)
    if args.command == "promise-replay":
        from backend.study.promise_check import replay_demo

        if not (args.run / "demo-state.json").is_file():
            print(f"{args.run} is not a demo run (no demo-state.json)", file=sys.stderr)
            return 2
        replay_demo(
            args.run, args.target_accuracy, args.confidence, log=lambda s: print(s, file=sys.stderr)
        )
        print((args.run / "promise-replay.md").read_text())
        return 0
    if args.command == "view-gate":
        from backend.study.view_gate import view_gate_study

        if not (args.run / "demo-state.json").is_file():
            print(f"{args.run} is not a demo run (no demo-state.json)", file=sys.stderr)
            return 2
        view_gate_study(
            args.run,
            args.target_accuracy,
            args.confidence,
            settings.validation_fraction,
            log=lambda s: print(s, file=sys.stderr),
        )
        print((args.run / "view-gate.md").read_text())
        return 0
    if args.command == "label-issues":
        return _label_issues(args, settings, labels)
    if args.command == "pretrain":
        return _pretrain(args, settings, labels)
    if args.command == "train":
        from backend.cli_labelstudio import run_train

        return run_train(args, settings, labels)
    if args.command == "compare-sizes":
        from backend.study.size_comparison import compare_sizes

        wafers, _ = _load(settings, labels)
        print(
            compare_sizes(
                wafers,
                labels,
                args.sizes,
                args.subsample,
                args.test_fraction,
                settings.backbone,
                args.epochs,
                args.batch_size,
                settings.device,
                args.seed,
            )
        )
        return 0
    return _simulate(args, settings, labels)


def _bench(args: argparse.Namespace, settings: Settings, labels: LabelConfig) -> int:
    from backend.harness.bench import BenchPlan, report_lines, run_bench, write_json

    plan = BenchPlan.quick(args.device) if args.quick else BenchPlan(device=args.device)
    result = run_bench(plan, settings, labels, log=lambda s: print(s, file=sys.stderr))
    print("\n".join(report_lines(result)))
    if args.json is not None:
        write_json(result, args.json)
        print(f"figures written to {args.json}")
    return 0


def _study_run(
    args: argparse.Namespace, settings: Settings, labels: LabelConfig, where: Path | None = None
) -> Any:
    """The study run in `where` (default args.out; a `backend.study.simulate.Study`), or None
    when there is none."""
    from backend.study.simulate import Study, StudyConfig

    where = args.out if where is None else where
    config_file = where / "config.json"
    if not config_file.is_file():
        print(f"{where}: no study run here (no config.json)", file=sys.stderr)
        return None
    saved = json.loads(config_file.read_text())
    config = StudyConfig(**(saved | {"loops": tuple(saved["loops"])}))
    wafers, _ = _load(settings, labels)
    return Study(config, wafers, labels, where, log=lambda s: print(s, file=sys.stderr))


def _label_issues(args: argparse.Namespace, settings: Settings, labels: LabelConfig) -> int:
    from backend.study.label_issues import (
        LabelIssueConfig,
        run_label_issues,
        run_label_issues_on_study,
    )

    auto_errors = None
    if args.auto_errors is not None:
        report = json.loads(args.auto_errors.read_text())
        auto_errors = {
            f"set {s['set']}": [int(w) for w in s["wrong_auto_wafers"]]
            for s in report["sets"]
            if "wrong_auto_wafers" in s
        }
    if args.from_study is not None:
        study = _study_run(args, settings, labels, args.from_study)
        if study is None:
            return 2
        run_label_issues_on_study(study, labels, args.out, auto_errors)
        print((args.out / "results.md").read_text())
        return 0
    wafers, _ = _load(settings, labels)
    config = LabelIssueConfig(
        subsample=args.subsample,
        folds=args.folds,
        backbone=args.backbone,
        image_size=args.image_size,
        epochs=args.epochs,
        seed=args.seed,
        device=args.device,
    )
    run_label_issues(
        wafers, labels, config, args.out, log=lambda s: print(s, file=sys.stderr),
        auto_errors=auto_errors,
    )  # fmt: skip
    print((args.out / "results.md").read_text())
    return 0


def _promise_check(args: argparse.Namespace, settings: Settings, labels: LabelConfig) -> int:
    from backend.study.promise_check import run_promise_check

    study = _study_run(args, settings, labels)
    if study is None:
        return 2
    run_promise_check(
        study,
        args.target_accuracy,
        args.confidence,
        args.resamples,
        args.set_size,
        log=lambda s: print(s, file=sys.stderr),
        pool=args.pool,
        calibration_size=args.calibration_size,
    )
    print((args.out / "promise-check" / "results.md").read_text())
    return 0


def _routing_study(args: argparse.Namespace, settings: Settings, labels: LabelConfig) -> int:
    from backend.study.routing_study import run_routing_study

    study = _study_run(args, settings, labels)
    if study is None:
        return 2
    run_routing_study(
        study,
        args.target_accuracy,
        args.confidence,
        args.views,
        log=lambda s: print(s, file=sys.stderr),
        reject_option_views=args.reject_option_views,
        hold_out=args.hold_out,
    )
    out = args.out / "routing-study" / args.hold_out
    print((out / "results.md").read_text())
    print(f"results and the accuracy-vs-engineer-ratio plot in {out}/")
    return 0


def _simulate(args: argparse.Namespace, settings: Settings, labels: LabelConfig) -> int:
    from backend.study.simulate import Study, StudyConfig

    config = StudyConfig(
        subsample=args.subsample,
        initial_fraction=args.initial_fraction,
        sets=args.sets,
        set_order=args.set_order,
        image_size=settings.image_size,
        backbone=settings.backbone,
        epochs=args.epochs,
        batch_size=args.batch_size,
        balance=args.balance,
        augment=not args.no_augment,
        retrain=args.retrain,
        phase_budget=args.phase_budget,
        replay_per_new_wafer=args.replay_per_new_wafer,
        retrain_learning_rate_scale=args.retrain_lr_scale,
        validation_fraction=args.validation_fraction,
        loops=tuple(x.strip() for x in args.loops.split(",") if x.strip()),
        target_accuracy=args.target_accuracy,
        calibration_measure=args.calibration_measure,
        calibrate_on=args.calibrate_on,
        confidence=args.confidence,
        seed=args.seed,
        device=settings.device,
        weights_path=str(settings.weights_path) if settings.weights_path else None,
        data=str(settings.data_path.resolve()),
    )
    wafers, _ = _load(settings, labels)
    start = time.perf_counter()
    study = Study(config, wafers, labels, args.out, log=lambda s: print(s, file=sys.stderr))
    study.prepare()
    study.run()
    minutes = (time.perf_counter() - start) / 60
    print((args.out / "results.md").read_text())
    print(f"study took {minutes:.1f} min; results, manifests and plots in {args.out}/")
    return 0
