"""`python -m backend bench-loop`: the loop at fab scale against a real Label Studio, timed.

Layer L3 (a benchmark, not a test). One run on the machine at hand:
1. imports a labelled history as set 0 (all of WM-811K's labelled wafers but one held-out set by
   default: 155,655), a held-out labelled set of 17,295 as set 1 (imported without its labels, so
   the accuracy of what the loop does to it is known) and 20,000 of WM-811K's unlabelled wafers
   as set 2, each with the wafer store beside it;
2. trains the first model offline on part of the history (`backend.first_model`, as
   `python -m backend train` does) and serves it;
3. opens set 1 as the worker would (`backend.preannotation.preannotate_set`: every wafer
   predicted, the confident ones accepted, the engineer queue sorted), timed against the
   3-minute target, and grades the auto labels against the held-out truth;
4. times the engineer tab's first page, `status` (count queries), and the retraining's read of
   every labelled wafer (Label Studio's export plus the wafer store), without training on them.
Prints a table and writes JSON. Label Studio runs on PostgreSQL when one answers on
127.0.0.1:5432 (else SQLite), in a throw-away data dir and database.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import psycopg
from redis import Redis

from backend.classifier import pick_device
from backend.files import atomic_write_text
from backend.first_model import history_from_wafers, train_first_model
from backend.harness.label_studio_db import LabelStudioDatabase
from backend.harness.stack import running_label_studio
from backend.job_resources import JobResources
from backend.label_config import parse_label_config
from backend.labelstudio import LabelStudioClient
from backend.loop_state import label_of
from backend.model_store import ModelStore
from backend.preannotation import preannotate_set
from backend.projects import ENGINEER_VIEW, make_views, set_counts
from backend.retraining import training_examples
from backend.settings import DEFAULT_DATA, Settings
from backend.sources import load_wafers
from backend.splits import stratified_sample
from backend.training import TrainConfig
from backend.wafer_sets import WM811K_SOURCE, PictureFiles, import_wafers
from backend.wafer_store import WaferStore
from backend.wafers import WaferMaps

#: The issue's target for opening a set of 17,295 wafers.
OPEN_TARGET_SECONDS = 180.0


@dataclass(frozen=True)
class LoopBenchConfig:
    """Sizes of the run. `history` 0 takes every labelled wafer not in the held-out set."""

    history: int = 0
    held_out: int = 17_295
    unlabelled: int = 20_000
    train_wafers: int = 17_295
    epochs: int = 2
    seed: int = 0
    database: str = "auto"
    out: Path = Path("bench-loop")


def _pick(n_total: int, n: int, rng: np.random.Generator) -> npt.NDArray[np.intp]:
    n = min(n, n_total)
    return np.sort(rng.choice(n_total, size=n, replace=False)).astype(np.intp)


def _timed(figures: dict[str, Any], name: str, wafers: int) -> Callable[[float], None]:
    def done(seconds: float) -> None:
        figures[name] = {
            "wafers": wafers,
            "seconds": round(seconds, 2),
            "wafers_per_second": round(wafers / seconds, 1) if seconds > 0 else None,
        }
        print(f"{name}: {wafers:,} wafers in {seconds:.1f} s", flush=True)

    return done


def task_table_bytes(database: LabelStudioDatabase) -> int:
    """The size of Label Studio's task table with its indexes and TOAST (PostgreSQL only)."""
    with psycopg.connect(
        host=database.host,
        port=database.port,
        user=database.user,
        password=database.password,
        dbname=database.name,
    ) as conn:
        row = conn.execute("SELECT pg_total_relation_size('task')").fetchone()
    return int(row[0]) if row else 0


def picture_storage_sizes(
    client: LabelStudioClient,
    database: LabelStudioDatabase,
    files_root: Path,
    settings: Settings,
    wafers: WaferMaps,
    n: int = 10_000,
) -> dict[str, Any]:
    """Label Studio's task-table growth for `n` wafers imported each way: pictures as data URLs
    inside the tasks, and as files served by its local-files storage (`--pictures`), with the
    files' own size. Each way in its own new project."""
    labels = parse_label_config(settings.label_config_path.read_text())
    rows = np.arange(min(n, len(wafers)))
    found: dict[str, Any] = {}
    for way in ("data URLs", "picture files"):
        project = client.create_project(f"pictures {way}", settings.label_config_path.read_text())
        pictures = None
        if way == "picture files":
            pictures = PictureFiles(files_root / f"wafers-{project}", files_root)
            pictures.folder.mkdir(parents=True, exist_ok=True)
            client.connect_local_files(project, pictures.folder)
        before = task_table_bytes(database)
        started = time.perf_counter()
        import_wafers(
            client,
            project,
            wafers,
            labels,
            [rows],
            source=WM811K_SOURCE,
            initial=True,
            chunk_size=2000,
            pictures=pictures,
            progress=False,
        )
        seconds = time.perf_counter() - started
        grown = task_table_bytes(database) - before
        files = sum(p.stat().st_size for p in pictures.folder.rglob("*.png")) if pictures else 0
        found[way] = {
            "wafers": len(rows),
            "task_table_mb_per_10k": round(grown / len(rows) * 10_000 / 2**20, 2),
            "picture_files_mb_per_10k": round(files / len(rows) * 10_000 / 2**20, 2),
            "import_wafers_per_second": round(len(rows) / seconds, 1),
        }
        print(f"{way}: {found[way]}", flush=True)
    return found


def run_bench_loop(config: LoopBenchConfig, settings: Settings) -> dict[str, Any]:
    """Run the benchmark (see the module docstring); returns the figures."""
    labels = parse_label_config(settings.label_config_path.read_text())
    labelled, _ = load_wafers(settings.data_path, labels.failure_types, settings.cache_dir)
    everything, _ = load_wafers(
        settings.data_path, labels.failure_types, settings.cache_dir, keep_unlabelled=True
    )
    rng = np.random.default_rng(config.seed)
    held = np.sort(stratified_sample(labelled.labels, config.held_out / len(labelled), rng))
    rest = np.setdiff1d(np.arange(len(labelled)), held)
    history = rest if config.history <= 0 else rest[_pick(len(rest), config.history, rng)]
    unlabelled_rows = np.flatnonzero(everything.labels < 0)
    new = unlabelled_rows[_pick(len(unlabelled_rows), config.unlabelled, rng)]
    figures: dict[str, Any] = {"config": {k: str(v) for k, v in dataclasses.asdict(config).items()}}
    out = config.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    model_dir = Path(tempfile.mkdtemp(prefix="models-", dir=out))
    with running_label_studio(
        Path(tempfile.mkdtemp(prefix="label-studio-", dir=out)),
        database=config.database,
        drop_database_on_exit=True,
    ) as ls:
        figures["label_studio_database"] = ls.database.describe()
        print(f"Label Studio on {ls.database.describe()}", flush=True)
        client = LabelStudioClient.connect(ls.url, ls.api_key, timeout=900)
        project = client.create_project("bench-loop", settings.label_config_path.read_text())
        auto_user = client.current_user_id()
        views = make_views(client, project, auto_user)
        store = WaferStore.for_project(model_dir, project)

        def imported(name: str, wafers: WaferMaps, rows: npt.NDArray[np.intp], **kw: Any) -> None:
            started = time.perf_counter()
            import_wafers(
                client,
                project,
                wafers,
                labels,
                [rows],
                source=WM811K_SOURCE,
                chunk_size=2000,
                store=store,
                **kw,
            )
            _timed(figures, name, len(rows))(time.perf_counter() - started)

        imported("import set 0 (labelled history)", labelled, history, initial=True)
        imported("import set 1 (held out, as new)", labelled, held)
        # The unlabelled rows of the same file are other wafer ids: no clash with set 0/1.
        imported("import set 2 (unlabelled)", everything, new)

        # The first model, trained offline on part of the history (`python -m backend train`).
        device = pick_device(settings.device)
        train_rows = history[_pick(len(history), config.train_wafers, rng)]
        first = history_from_wafers(
            labelled.subset(train_rows),
            settings.image_size,
            subsample=1.0,
            seed=config.seed,
            source=WM811K_SOURCE,
            in_project=len(train_rows),
            origin="bench-loop history",
        )
        model_store = ModelStore.for_project(model_dir, project, device)
        started = time.perf_counter()
        classifier, train_figures = train_first_model(
            first,
            labels,
            settings,
            TrainConfig(epochs=config.epochs, seed=config.seed),
            version=model_store.next_version("set0"),
            project=project,
            device=device,
        )
        model_store.publish(classifier)
        figures["first model"] = {
            "train_wafers": int(train_figures["train_wafers"]),
            "epochs": config.epochs,
            "seconds": round(time.perf_counter() - started, 1),
            "train_wafers_per_second": round(train_figures["train_wafers_per_second"], 1),
            "validation_accuracy": classifier.card.metrics.get("validation_accuracy"),
            "backbone": classifier.card.backbone,
            "image_size": classifier.card.image_size,
        }
        print(f"first model: {figures['first model']}", flush=True)

        redis = Redis.from_url(settings.redis_url)
        bench = JobResources(
            settings=dataclasses.replace(settings, model_dir=model_dir),
            labels=labels,
            client=client,
            store=model_store,
            redis=redis,
            auto_user=auto_user,
            wafers=store,
        )
        started = time.perf_counter()
        opened = preannotate_set(bench, project, 1, classifier)
        seconds = time.perf_counter() - started
        _timed(figures, "open set 1 (predict, store, accept)", len(held))(seconds)
        figures["open set 1 (predict, store, accept)"] |= {
            "target_seconds": OPEN_TARGET_SECONDS,
            "met": seconds <= OPEN_TARGET_SECONDS,
            "outcome": opened,
        }

        started = time.perf_counter()
        page = client.view_page(project, views[ENGINEER_VIEW])
        figures["engineer tab first page seconds"] = round(time.perf_counter() - started, 2)
        scores = [float(t.get("predictions_score") or 0.0) for t in page]
        figures["engineer tab sorted"] = scores == sorted(scores)

        started = time.perf_counter()
        states = set_counts(client, project, auto_user, classifier.card.version)
        figures["status seconds"] = round(time.perf_counter() - started, 2)
        figures["status"] = {n: dataclasses.asdict(s) for n, s in states.items()}

        started = time.perf_counter()
        tasks = client.labelled_tasks(project)
        listed = time.perf_counter() - started
        examples = training_examples(bench, tasks, classifier.card.image_size)
        _timed(figures, "retraining read of labelled wafers", len(examples.task_ids))(
            time.perf_counter() - started
        )
        figures["retraining read of labelled wafers"]["export_seconds"] = round(listed, 2)

        truth = dict(
            zip(
                labelled.source_row[held].tolist(),
                labelled.label_names()[held].tolist(),
                strict=True,
            )
        )
        auto = wrong = 0
        for task in tasks:
            data = task.get("data") or {}
            if data.get("set") != 1:
                continue
            auto += 1
            if label_of(task, labels, auto_user) != truth.get(int(data.get("wafer_id", -1))):
                wrong += 1
        figures["set 1 auto labels"] = {
            "auto": auto,
            "auto_share": round(auto / len(held), 4),
            "wrong": wrong,
            "accuracy_with_engineers_right": round(1 - wrong / len(held), 5),
        }
        if ls.database.kind == "postgresql":
            figures["picture storage"] = picture_storage_sizes(
                client, ls.database, ls.files_root, settings, labelled.subset(history[:10_000])
            )
        client.close()
        redis.close()
    atomic_write_text(out / "bench-loop.json", json.dumps(figures, indent=1, default=str))
    return figures


def main(config: LoopBenchConfig) -> int:
    settings = Settings.from_env(os.environ)
    if not settings.data_path.exists():
        settings = dataclasses.replace(settings, data_path=DEFAULT_DATA)
    figures = run_bench_loop(config, settings)
    print(json.dumps(figures, indent=1, default=str))
    return 0
