"""The Label Studio commands of the CLI: setup-project, import-sets, import-wafers, train, status,
retrain. Layer L3."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt
from redis import Redis

from backend.classifier import WaferClassifier, pick_device
from backend.first_model import (
    History,
    history_from_tasks,
    history_from_wafers,
    train_first_model,
)
from backend.image_client import image_client
from backend.images import picture_reader
from backend.label_config import LabelConfig
from backend.labelstudio import LabelStudioClient
from backend.loop_keys import request_advance
from backend.model_store import ModelStore
from backend.projects import (
    audit_table,
    bulk_webhook_url,
    lookup_project_id,
    project_audits,
    project_status,
    status_table,
    wire_project,
)
from backend.settings import Settings
from backend.sources import load_wafers
from backend.splits import stratified_sample
from backend.training import TrainConfig
from backend.wafer_sets import (
    INITIAL_SET,
    ImportOutcome,
    PictureFiles,
    cut_into_sets,
    import_sets,
    import_wafers,
    plan_sets,
    source_name,
    write_truth,
)
from backend.wafer_store import WaferStore
from backend.wafers import WaferMaps


def _say(text: str) -> None:
    print(text, file=sys.stderr)


def run_label_studio_command(
    args: argparse.Namespace, settings: Settings, labels: LabelConfig
) -> int:
    url, key = settings.require_label_studio()
    with LabelStudioClient.connect(url, key) as client:
        if args.command == "setup-project":
            if args.backend_url:
                settings = dataclasses.replace(settings, backend_url=args.backend_url)
            wiring = wire_project(client, settings, args.title, settings.backend_url)
            verb = "created" if wiring.created else "found"
            print(f"{verb} project {wiring.project} ({args.title!r}) at {url}")
            print(f"ML backend {wiring.ml_backend}: {settings.backend_url}")
            print(f"webhook {wiring.webhook}: {settings.backend_url}/webhook")
            print(
                f"webhook {wiring.bulk_webhook} (bulk events, no payload): "
                f"{bulk_webhook_url(settings.backend_url, wiring.project)}"
            )
            for title, view in wiring.views.items():
                print(f"view {view}: {title}")
            return 0
        project = lookup_project_id(client, args.project)
        if args.command == "import-sets":
            wafers, report = load_wafers(
                settings.data_path, labels.failure_types, settings.cache_dir
            )
            _say(report.summary())
            plan = plan_sets(
                wafers,
                subsample=args.subsample,
                initial_fraction=args.initial_fraction,
                n_sets=args.sets,
                seed=args.seed,
            )
            write_truth(args.truth, plan)
            imported = import_sets(
                client,
                project,
                plan,
                labels,
                args.only,
                report=_say,
                store=WaferStore.for_project(settings.model_dir, project),
                pictures=picture_files(args.pictures, settings, client, project),
            )
            total = sum(len(ids) for ids in imported.values())
            print(f"imported {total} wafers into project {project}; truth in {args.truth}")
            return 0
        if args.command == "import-wafers":
            outcome = import_wafer_file(args, settings, labels, client, project)
            print(f"{outcome.summary()} into project {project}")
            return 0
        if args.command == "status":
            store = ModelStore.for_project(settings.model_dir, project, pick_device("cpu"))
            states, versions = project_status(client, store, project)
            print(status_table(states, versions))
            audits = project_audits(
                client,
                WaferStore.for_project(settings.model_dir, project),
                states,
                labels,
                settings.target_accuracy,
            )
            if audits:
                print("\nBlind audits (random auto-routed wafers labelled by engineers):\n")
                print(audit_table(audits))
            return 0
        queued = request_advance(Redis.from_url(settings.redis_url), project)
        print("queued" if queued else "a step is already queued", f"for project {project}")
        return 0


def picture_files(
    folder: Path | None, settings: Settings, client: LabelStudioClient, project: int
) -> PictureFiles | None:
    """`--pictures DIR`: picture files under DIR, which Label Studio is told to serve."""
    if folder is None:
        return None
    if settings.local_files_root is None:
        raise ValueError(
            "--pictures needs LOCAL_FILES_DOCUMENT_ROOT: the folder Label Studio serves local "
            "files from (start it with LOCAL_FILES_SERVING_ENABLED=true and the same variable)"
        )
    pictures = PictureFiles(folder, settings.local_files_root)
    pictures.folder.mkdir(parents=True, exist_ok=True)
    client.connect_local_files(project, pictures.folder)
    return pictures


def _select_rows(wafers: WaferMaps, args: argparse.Namespace) -> npt.NDArray[np.intp]:
    """The wafers the import takes: labelled ones for set 0 (a stratified subsample), else
    those without a failure type (or, with --rows labelled, the labelled ones as if new)."""
    if args.initial:
        labelled = np.flatnonzero(wafers.labels >= 0)
        rng = np.random.default_rng(args.seed)
        return labelled[stratified_sample(wafers.labels[labelled], args.subsample, rng)]
    if args.rows == "labelled":
        return np.flatnonzero(wafers.labels >= 0)
    return np.flatnonzero(wafers.labels < 0)


def import_wafer_file(
    args: argparse.Namespace,
    settings: Settings,
    labels: LabelConfig,
    client: LabelStudioClient,
    project: int,
) -> ImportOutcome:
    """`import-wafers`: read the file, cut the sets, import them (see `import_wafers`)."""
    source = source_name(settings.data_path, args.source)
    labelled_only = args.initial or args.rows == "labelled"
    wafers, report = load_wafers(
        settings.data_path,
        labels.failure_types,
        settings.cache_dir,
        keep_unlabelled=not labelled_only,
    )
    _say(report.summary())
    if report.unknown_labels:
        found = ", ".join(f"{k!r} x{v:,}" for k, v in sorted(report.unknown_labels.items()))
        raise ValueError(
            f"{settings.data_path} has failure types that the labeling config does not know "
            f"({found}); the config's types are {', '.join(labels.failure_types)}. Fix the "
            "labels ('' for a wafer without one) or the labeling config."
        )
    rows = _select_rows(wafers, args)
    if rows.size == 0:
        raise ValueError(f"{settings.data_path} holds no wafers of the kind asked for")
    if args.initial:
        sets = [rows]
    else:
        cut = cut_into_sets(wafers.lots[rows], per_set=args.per_set, lots_per_set=args.lots_per_set)
        sets = [rows[members] for members in cut[: args.max_sets]]
    _say(
        f"{sum(len(s) for s in sets):,} wafers of {source} in {len(sets)} "
        f"{'initial set' if args.initial else 'new sets'}"
    )
    return import_wafers(
        client,
        project,
        wafers,
        labels,
        sets,
        source=source,
        initial=args.initial,
        store=WaferStore.for_project(settings.model_dir, project),
        pictures=picture_files(args.pictures, settings, client, project),
    )


def run_train(args: argparse.Namespace, settings: Settings, labels: LabelConfig) -> int:
    """`train`: a first model on labelled history, published for the project and served.

    With `--data` and a project id (a number) it needs no Label Studio: the hold-out is keyed by
    each wafer's own identity, so a first model can be trained where Label Studio is out of
    reach (a GPU box, a build job) and published into MODEL_DIR there or copied. A project
    title, or `--from-project`, asks Label Studio."""
    device = pick_device(settings.device)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)
    size = settings.image_size
    offline = not args.from_project and str(args.project).isascii() and args.project.isdigit()
    if offline:
        project = int(args.project)
        history = _file_history(args, settings, labels, size)
    else:
        url, key = settings.require_label_studio()
        with LabelStudioClient.connect(url, key) as client:
            project = lookup_project_id(client, args.project)
            if args.from_project:
                tasks = client.tasks_of_set(project, INITIAL_SET)
                with image_client(url, settings.image_hosts) as http:
                    fetch = picture_reader(settings, size, http)
                    history = history_from_tasks(
                        tasks,
                        labels,
                        client.current_user_id(),
                        fetch,
                        size,
                        origin=f"project {project} set {INITIAL_SET}",
                    )
            else:
                history = _file_history(args, settings, labels, size)
    _say(
        f"training {settings.backbone} at {size}x{size} on {len(history):,} labelled wafers "
        f"for project {project}, {args.epochs} epochs, {device}"
    )
    store = ModelStore.for_project(settings.model_dir, project, device)
    model, figures = train_first_model(
        history,
        labels,
        settings,
        config,
        version=store.next_version(f"set{INITIAL_SET}"),
        project=project,
        device=device,
    )
    model = publish_as_next(store, model, f"set{INITIAL_SET}")
    version = model.card.version
    metrics = model.card.metrics
    accuracy = metrics.get("validation_accuracy")
    print(
        f"published {version} for project {project} in {store.root} and serving it: "
        f"trained through set {INITIAL_SET} on {int(figures['train_wafers']):,} wafers at "
        f"{figures['train_wafers_per_second']:.1f} wafers/s; "
        + (
            f"validation accuracy {accuracy:.2%} on {int(metrics['validation_wafers']):,} "
            f"held-out wafers, routing threshold {metrics['route_threshold']:.4g}"
            if accuracy is not None
            else "no held-out wafers, so every wafer goes to engineers until a retraining"
        )
    )
    return 0


def _file_history(
    args: argparse.Namespace, settings: Settings, labels: LabelConfig, size: int
) -> History:
    source = source_name(settings.data_path, args.source)
    wafers, report = load_wafers(settings.data_path, labels.failure_types, settings.cache_dir)
    _say(report.summary())
    return history_from_wafers(
        wafers,
        size,
        subsample=args.subsample,
        seed=args.seed,
        source=source,
        origin=f"{settings.data_path.name} (subsample {args.subsample})",
    )


def publish_as_next(store: ModelStore, model: WaferClassifier, label: str) -> WaferClassifier:
    """Publish `model` and serve it; when its version name was taken meanwhile (the worker
    published one while this trained), under the next free name. The model as published."""
    for _ in range(5):
        try:
            store.publish(model)
            return model
        except ValueError:
            if not store.path_of(model.card.version).exists():
                raise
            card = dataclasses.replace(model.card, version=store.next_version(label))
            model = dataclasses.replace(model, card=card)
    raise RuntimeError(f"could not find a free version name for {label} in {store.root}")
