"""`python -m backend demo`: the whole system on this machine, and optionally the whole loop.

Layer L3. Starts Redis (unless one answers at REDIS_URL), Label Studio on 127.0.0.1 with a
preset admin, an `auto-labeler` account for the backend and an `engineer` account, the backend
under gunicorn and one rq worker; creates and wires the project; imports the initial set (with
its known labels) and the wafer sets of a WM-811K subsample; prints where to log in.

With `--simulate-engineers` it then plays the engineers: for each set in turn it waits until
the backend has pre-annotated and auto-accepted it, labels the uncertain wafers with their true
failure types through the SDK, and measures the time from that last label to the next set
being pre-annotated and accepted by the retrained model. It ends with a per-set table.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from redis import Redis

from backend.audit import SetAudit
from backend.classifier import pick_device
from backend.files import atomic_write_text
from backend.first_model import cached_first_model, history_from_wafers
from backend.harness.simulated_engineers import (
    SetCheck,
    label_uncertain,
    set_outcome,
    wait_until_idle,
)
from backend.harness.stack import (
    Credentials,
    create_user,
    free_port,
    running_backend,
    running_label_studio,
    running_redis,
    running_worker,
    wait_for_worker,
)
from backend.jobs import WORKER_CLASS
from backend.label_config import LabelConfig
from backend.labelstudio import LabelStudioClient
from backend.loop_keys import QUEUES, request_advance
from backend.model_store import ModelStore
from backend.projects import ENGINEER_VIEW, wire_project
from backend.settings import FIRST_MODEL_EPOCHS, Settings
from backend.splits import StudySplit, stratified_sample
from backend.training import TrainConfig
from backend.wafer_sets import (
    INITIAL_SET,
    WM811K_SOURCE,
    SetPlan,
    import_sets,
    plan_sets,
    read_truth,
    write_truth,
)
from backend.wafer_store import WaferStore
from backend.wafers import WaferMaps

PROJECT_TITLE = "Wafer maps (demo)"
AUTO_LABELER = "auto-labeler@example.com"
ENGINEER = "engineer@example.com"


@dataclass(frozen=True)
class DemoConfig:
    out: Path
    subsample: float
    initial_fraction: float
    sets: int
    seed: int
    label_studio_port: int
    simulate_engineers: bool
    set_timeout_s: float = 3600.0
    #: Label Studio's database: auto (PostgreSQL on 127.0.0.1:5432 when it answers), sqlite,
    #: postgresql, or an admin URL (backend.harness.label_studio_db).
    database: str = "auto"
    #: The labelled history the first model is trained on, offline (the study's initial 10%:
    #: 17,295 wafers); 0 keeps the old way (the worker trains on a subsample's set 0).
    first_model_wafers: int = 17_295
    #: Wafers per set after the history (with `first_model_wafers`).
    set_size: int = 2_000
    first_model_epochs: int = FIRST_MODEL_EPOCHS
    #: Carry on with the run in `out` (its Label Studio, project, models and finished sets)
    #: instead of starting afresh; the same sizes and seed must be given.
    resume: bool = False
    #: Simulated engineers labelling each set's queue at once (one account, several threads).
    engineers: int = 1


#: What a resumed demo needs of the run it carries on: project, users, and the sizes it used.
STATE_FILE = "demo-state.json"


@dataclass(frozen=True)
class SetRow:
    outcome: SetCheck
    engineer_seconds: float  # labelling the uncertain wafers through the SDK
    #: Last label -> next set pre-annotated and accepted; None when this run did not see the
    #: last label (a set finished before a --resume).
    next_set_seconds: float | None
    #: The set's blind audit as the retraining recorded it (None: audits off).
    audit: SetAudit | None = None
    #: The prediction score at and above which the set's wafers were auto-labelled.
    cut: float | None = None
    target_accuracy: float = 0.995
    #: Training time of the model that learnt this set (its card's train_seconds).
    retrain_seconds: float | None = None
    #: The open step of this set: predict every wafer, store the predictions, accept the
    #: confident ones (seconds the worker reported; None when rq no longer kept its result).
    opening_seconds: float | None = None
    #: The whole retraining job that learnt this set (read the labels, train, calibrate,
    #: publish) and its read of the labelled wafers (`backend.label_reads`), as the worker
    #: reported them (None when rq no longer kept the result).
    retraining_job_seconds: float | None = None
    label_read_seconds: float | None = None
    #: The read ahead of the labels while this set was labelled (`backend.jobs.read_ahead_job`).
    read_ahead_seconds: float | None = None

    @property
    def promise_met(self) -> bool:
        return self.outcome.waiting == 0 and self.outcome.accuracy >= self.target_accuracy


def _service_env(settings: Settings, ls_url: str, token: str, redis_url: str) -> dict[str, str]:
    env = {
        "LABEL_STUDIO_URL": ls_url,
        "LABEL_STUDIO_API_KEY": token,
        "REDIS_URL": redis_url,
        "MODEL_DIR": str(settings.model_dir),
        "WAFER_BACKBONE": settings.backbone,
        "WAFER_IMAGE_SIZE": str(settings.image_size),
        "WAFER_DEVICE": settings.device,
        "WAFER_EPOCHS": str(settings.epochs),
        "WAFER_TARGET_ACCURACY": str(settings.target_accuracy),
        "WAFER_ROUTE_MEASURE": settings.route_measure,
        "WAFER_CACHE_DIR": str(settings.cache_dir),
        "LABEL_CONFIG": str(settings.label_config_path),
    }
    if settings.route_threshold is not None:
        env["WAFER_ROUTE_THRESHOLD"] = str(settings.route_threshold)
    if settings.weights_path is not None:
        env["WAFER_WEIGHTS"] = str(settings.weights_path)
    return env


def demo_plan(wafers: WaferMaps, config: DemoConfig) -> SetPlan:
    """With a first model: set 0 is a stratified `first_model_wafers` of the labelled wafers (the
    history), sets 1..N are `set_size` random others each. Without: the study's split of a
    `subsample` (`plan_sets`)."""
    if config.first_model_wafers <= 0:
        return plan_sets(
            wafers,
            subsample=config.subsample,
            initial_fraction=config.initial_fraction,
            n_sets=config.sets,
            seed=config.seed,
        )
    rng = np.random.default_rng(config.seed)
    initial = stratified_sample(wafers.labels, config.first_model_wafers / len(wafers), rng)
    rest = rng.permutation(np.setdiff1d(np.arange(len(wafers)), initial))
    if len(rest) < config.sets * config.set_size:
        raise ValueError(
            f"{len(rest):,} wafers left after the history; {config.sets} sets of "
            f"{config.set_size:,} need {config.sets * config.set_size:,}"
        )
    sets = tuple(
        np.sort(rest[i * config.set_size : (i + 1) * config.set_size]) for i in range(config.sets)
    )
    return SetPlan(wafers, StudySplit(initial, sets))


def publish_first_model(
    config: DemoConfig,
    settings: Settings,
    labels: LabelConfig,
    plan: SetPlan,
    project: int,
    say: Callable[[str], None],
) -> None:
    """Train (or take from the cache) the first model on set 0 and serve it for the project."""
    store = WaferStore.for_project(settings.model_dir, project)
    task_of = store.set_task_ids(INITIAL_SET)
    history = history_from_wafers(
        plan.wafers.subset(plan.members(INITIAL_SET)),
        settings.image_size,
        subsample=1.0,
        seed=config.seed,
        source=WM811K_SOURCE,
        in_project=len(task_of),
        origin=f"the demo's set 0 ({len(task_of):,} wafers)",
    )
    device = pick_device(settings.device)
    models = ModelStore.for_project(settings.model_dir, project, device)
    say(
        f"first model: {settings.backbone} at {settings.image_size}x{settings.image_size} on "
        f"{len(history):,} labelled wafers, {config.first_model_epochs} epochs (trained once, "
        "then cached); Label Studio is up meanwhile"
    )
    started = time.monotonic()
    classifier, cached = cached_first_model(
        history,
        labels,
        settings,
        TrainConfig(epochs=config.first_model_epochs, seed=config.seed),
        version=models.next_version("set0"),
        project=project,
        device=device,
        cache_dir=settings.cache_dir,
        data_identity=f"{settings.data_path.name}:{settings.data_path.stat().st_size}",
    )
    models.publish(classifier)
    accuracy = classifier.card.metrics.get("validation_accuracy")
    say(
        f"first model {classifier.card.version} "
        f"{'from the cache' if cached else f'trained in {time.monotonic() - started:.0f} s'}"
        + (f", validation accuracy {accuracy:.2%}" if accuracy is not None else "")
    )


#: Per-set figures read from the results of finished jobs (`finished_job_seconds`).
JOB_FIGURES = ("opening", "retraining", "label_read", "read_ahead")


def finished_job_seconds(redis: Redis, project: int) -> dict[str, dict[int, float]]:
    """Per set, from the results rq still keeps of the project's finished jobs: `opening`, the
    seconds of its open step(s) (an advance's, or a retraining's follow-up advance); and for
    the retraining that learnt the set, `retraining` (the whole job) and `label_read` (its
    read of the labelled wafers); `read_ahead`, the read ahead of the labels while the set was
    labelled."""
    from rq import Queue
    from rq.registry import FinishedJobRegistry

    found: dict[str, dict[int, float]] = {name: {} for name in JOB_FIGURES}
    for name in QUEUES:
        queue = Queue(name, connection=redis)
        ids = FinishedJobRegistry(queue=queue).get_job_ids()
        for job in queue.job_class.fetch_many(ids, connection=redis):
            result = job.return_value() if job is not None else None
            if not isinstance(result, dict):
                continue
            if result.get("action") == "retrain" and job is not None and job.args[:1] == (project,):
                number = int(result["set"])
                if result.get("seconds") is not None:
                    found["retraining"][number] = float(result["seconds"])
                read = result.get("label_read")
                if isinstance(read, dict) and read.get("seconds") is not None:
                    found["label_read"][number] = float(read["seconds"])
            if (
                result.get("action") == "read-ahead"
                and job is not None
                and job.args[:1] == (project,)
                and isinstance(ahead := result.get("label_read"), dict)
                and ahead.get("seconds") is not None
            ):
                found["read_ahead"][int(result["set"])] = float(ahead["seconds"])
            for outcome in (result, result.get("next")):
                if not isinstance(outcome, dict) or outcome.get("project") != project:
                    continue
                for step in outcome.get("steps") or []:
                    if step.get("action") == "open" and step.get("seconds") is not None:
                        number = int(step["set"])
                        opened = found["opening"]
                        opened[number] = opened.get(number, 0.0) + float(step["seconds"])
    return found


#: Where a run keeps the figures it has seen (rq forgets finished jobs after a while).
JOB_SECONDS_FILE = "job-seconds.json"
#: The same, written by runs before the retraining figures were kept (opening seconds only).
OPENINGS_FILE = "opening-seconds.json"


def seen_job_seconds(out: Path) -> dict[str, dict[int, float]]:
    """The per-set job figures a run in `out` has seen so far (none when new)."""
    path, older = out / JOB_SECONDS_FILE, out / OPENINGS_FILE
    if path.exists():
        kept = json.loads(path.read_text())
    elif older.exists():
        kept = {"opening": json.loads(older.read_text())}
    else:
        kept = {}
    return {name: {int(k): float(v) for k, v in kept.get(name, {}).items()} for name in JOB_FIGURES}


def more_job_seconds(
    seen: dict[str, dict[int, float]], now: dict[str, dict[int, float]]
) -> dict[str, dict[int, float]]:
    """Both, per figure and set the larger (rq may have dropped some of a set's jobs since)."""
    return {
        name: {
            k: max(seen[name].get(k, 0.0), now[name].get(k, 0.0))
            for k in seen[name].keys() | now[name].keys()
        }
        for name in JOB_FIGURES
    }


def keep_job_seconds(out: Path, figures: dict[str, dict[int, float]]) -> None:
    atomic_write_text(
        out / JOB_SECONDS_FILE,
        json.dumps({name: {str(k): v for k, v in f.items()} for name, f in figures.items()}),
    )


def _clear_loop_state(redis: Redis) -> None:
    """Forget the loop keys and queued jobs of an earlier demo (its projects are gone)."""
    from rq import Queue

    for key in redis.scan_iter("wafermap:*"):
        redis.delete(key)
    for name in QUEUES:
        Queue(name, connection=redis).empty()


def run_demo(
    config: DemoConfig,
    settings: Settings,
    labels: LabelConfig,
    wafers: WaferMaps,
    say: Callable[[str], None],
) -> list[SetRow]:
    """Bring the system up, import the sets, and (optionally) run the loop to the end."""
    out = config.out.resolve()
    state = _read_state(out, config) if config.resume else None
    if state is None:
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
    settings = dataclasses.replace(settings, model_dir=out / "models")
    plan = demo_plan(wafers, config)
    truth_path = out / "truth.csv" if state is not None else write_truth(out / "truth.csv", plan)
    say(
        f"wafer sets: initial {len(plan.split.initial)}, "
        + ", ".join(f"set {i + 1}: {len(s)}" for i, s in enumerate(plan.split.sets))
    )
    rows: list[SetRow] = read_rows(out) if state is not None else []
    if state is not None:
        say(f"carrying on with the run in {out}: {len(rows)} of {config.sets} sets finished")
    with ExitStack() as stack:
        redis_url = stack.enter_context(running_redis(settings.redis_url, out / "redis"))
        redis = Redis.from_url(redis_url)
        if state is None:
            _clear_loop_state(redis)
        say("starting Label Studio (1-3 minutes on a first start: database migrations) ...")
        ls = stack.enter_context(
            running_label_studio(
                out / "label-studio", port=config.label_studio_port, database=config.database
            )
        )
        say(f"Label Studio runs on {ls.database.describe()}")
        if state is None:
            auto = create_user(ls, AUTO_LABELER, secrets.token_urlsafe(16))
            engineer = create_user(ls, ENGINEER, secrets.token_urlsafe(16))
        else:  # the same users, with the tokens they were made with
            auto = create_user(ls, AUTO_LABELER, state["auto"]["password"], state["auto"]["token"])
            engineer = create_user(
                ls, ENGINEER, state["engineer"]["password"], state["engineer"]["token"]
            )
        env = _service_env(settings, ls.url, auto.token, redis_url)
        # a resumed run serves on the port Label Studio knows the backend and its webhook by
        backend_port = state["backend_port"] if state is not None else free_port()
        backend_url = stack.enter_context(running_backend(env, backend_port, out / "backend.log"))

        def start_worker() -> None:
            stack.enter_context(
                running_worker(
                    env, redis_url, QUEUES, out / "worker.log", worker_class=WORKER_CLASS
                )
            )
            wait_for_worker(redis_url, QUEUES, timeout=60)

        if not config.first_model_wafers and state is None:
            start_worker()
        service = dataclasses.replace(
            settings, label_studio_url=ls.url, label_studio_api_key=auto.token
        )
        with LabelStudioClient.connect(ls.url, auto.token) as backend_account:
            auto_user = backend_account.current_user_id()
            with LabelStudioClient.connect(ls.url, ls.api_key) as admin:
                wiring = wire_project(admin, service, PROJECT_TITLE, backend_url, auto_user)
            if state is None:
                import_sets(
                    backend_account,
                    wiring.project,
                    plan,
                    labels,
                    report=say,
                    store=WaferStore.for_project(settings.model_dir, wiring.project),
                )
        _print_login(ls.url, ls.admin, engineer, wiring.project, wiring.views, out, say)
        if state is not None:
            start_worker()  # its first advance repairs what the stopped run left behind
            request_advance(redis, wiring.project)
        elif config.first_model_wafers:
            # The worker starts once the first model is served, so it opens set 1 with it
            # instead of training its own on set 0 (the import's events wait in Redis).
            publish_first_model(config, settings, labels, plan, wiring.project, say)
            start_worker()
            request_advance(redis, wiring.project)
        if state is None:
            atomic_write_text(
                out / STATE_FILE,
                json.dumps(
                    {
                        "project": wiring.project,
                        "auto": auto.__dict__,
                        "engineer": engineer.__dict__,
                        "sizes": _sizes(config),
                        "backend_port": backend_port,
                    }
                ),
                mode=0o600,
            )
        atomic_write_text(
            out / "logins.json",
            json.dumps({"url": ls.url, "admin": ls.admin.__dict__, "engineer": engineer.__dict__}),
            mode=0o600,
        )
        if not config.simulate_engineers:
            say("the loop runs; press Ctrl-C to stop everything")
            while True:
                time.sleep(3600)
        truth = read_truth(truth_path)
        if state is None:
            say(
                "opening set 1 with the first model ..."
                if config.first_model_wafers
                else "training the first model on the initial set and opening set 1 ..."
            )
        wait_until_idle(redis, wiring.project, config.set_timeout_s)
        # rq keeps results for minutes only: what was seen is kept beside the run (a resumed run
        # still reports the opening of the set that was open when it stopped)
        jobs = more_job_seconds(seen_job_seconds(out), finished_job_seconds(redis, wiring.project))
        keep_job_seconds(out, jobs)
        with (
            LabelStudioClient.connect(ls.url, engineer.token) as person,
            LabelStudioClient.connect(ls.url, auto.token) as backend_account,
        ):
            for number in range(len(rows) + 1, config.sets + 1):
                start = time.monotonic()
                labelled = label_uncertain(
                    person, wiring.project, number, truth, labels, config.engineers
                )
                engineer_seconds = time.monotonic() - start
                waited = wait_until_idle(
                    redis, wiring.project, config.set_timeout_s, background=False
                )
                # A resumed run that found the set finished did not see its last label.
                next_seconds = waited if labelled or state is None else None
                jobs = more_job_seconds(jobs, finished_job_seconds(redis, wiring.project))
                keep_job_seconds(out, jobs)
                outcome = set_outcome(
                    backend_account, wiring.project, number, truth, labels, auto_user
                )
                store = WaferStore.for_project(settings.model_dir, wiring.project)
                routing = next((r for r in store.routings() if r.set_number == number), None)
                models = ModelStore.for_project(
                    settings.model_dir, wiring.project, pick_device("cpu")
                )
                learnt = [
                    c
                    for v in models.versions()
                    if (c := models.card(v)).trained_through_set == number
                ]
                rows.append(
                    SetRow(
                        outcome,
                        engineer_seconds,
                        next_seconds,
                        audit=store.audit(number),
                        cut=routing.cut if routing is not None else None,
                        target_accuracy=settings.target_accuracy,
                        retrain_seconds=learnt[-1].training.get("train_seconds")
                        if learnt
                        else None,
                        opening_seconds=jobs["opening"].get(number),
                        retraining_job_seconds=jobs["retraining"].get(number),
                        label_read_seconds=jobs["label_read"].get(number),
                        read_ahead_seconds=jobs["read_ahead"].get(number),
                    )
                )
                write_results(out, rows)
                say(
                    f"set {number}: {outcome.engineer} engineer labels ({labelled} now), "
                    f"{outcome.auto} auto labels, {outcome.auto_errors} wrong, model "
                    f"{outcome.model_version}; "
                    + (
                        f"next set ready {next_seconds:.1f} s after the last engineer label"
                        if next_seconds is not None
                        else "finished before this run resumed (next-set time not seen)"
                    )
                )
    return rows


def write_results(out: Path, rows: list[SetRow]) -> None:
    """results.json, results.md and report.json of the sets finished so far (after each set,
    so a long run that is stopped keeps what it measured)."""
    atomic_write_text(out / "results.json", json.dumps([_row_json(r) for r in rows], indent=2))
    atomic_write_text(out / "rows.json", json.dumps([dataclasses.asdict(r) for r in rows]))
    atomic_write_text(out / "results.md", results_table(rows))
    atomic_write_text(out / "report.json", json.dumps(report(rows), indent=2))


def read_rows(out: Path) -> list[SetRow]:
    """The finished sets `write_results` kept (none when it wrote nothing yet)."""
    path = out / "rows.json"
    if not path.exists():
        return []
    rows = []
    for d in json.loads(path.read_text()):
        audit = d.pop("audit")
        outcome = SetCheck(**d.pop("outcome"))
        rows.append(SetRow(outcome, audit=SetAudit(**audit) if audit else None, **d))
    return rows


def _sizes(config: DemoConfig) -> dict[str, Any]:
    """The settings a resumed run must share with the run it carries on."""
    keys = ("subsample", "initial_fraction", "sets", "seed", "first_model_wafers", "set_size")
    return {k: getattr(config, k) for k in keys}


def _read_state(out: Path, config: DemoConfig) -> dict[str, Any]:
    path = out / STATE_FILE
    if not path.exists():
        raise ValueError(
            f"--resume: {path} is missing (the first run stopped before its sets were imported "
            "and its first model served, or ran elsewhere); run again without --resume"
        )
    state: dict[str, Any] = json.loads(path.read_text())
    if state["sizes"] != _sizes(config):
        raise ValueError(
            f"--resume: the run in {out} used {state['sizes']}; give the same sizes and seed"
        )
    return state


def report(rows: list[SetRow]) -> dict[str, Any]:
    """`report.json`: per set its wafers, engineer labels (audit wafers included), the blind
    audit's figures, the true accuracy of the auto labels and of all labels, and whether the
    promise was met; then the totals."""
    sets = []
    for r in rows:
        o = r.outcome
        a = r.audit.summary() if r.audit is not None else {}
        sets.append(
            {
                "set": o.set_number,
                "wafers": o.wafers,
                "engineer_labels": o.engineer,
                "engineer_share": o.engineer_ratio,
                "audit_wafers": a.get("audited", 0),
                "audited_accuracy": a.get("audited_accuracy"),
                "audited_interval": [a.get("audited_accuracy_low"), a.get("audited_accuracy_high")]
                if a
                else None,
                "auto_labels": o.auto,
                "auto_label_accuracy": 1 - o.auto_errors / o.auto if o.auto else None,
                "true_accuracy": o.accuracy,
                "target_accuracy": r.target_accuracy,
                "promise_met": r.promise_met,
                "cut": r.cut,
                "model_version": o.model_version,
                "model_accuracy": o.model_accuracy,
                "retrain_seconds": r.retrain_seconds,
                "opening_seconds": r.opening_seconds,
                "retraining_job_seconds": r.retraining_job_seconds,
                "label_read_seconds": r.label_read_seconds,
                "read_ahead_seconds": r.read_ahead_seconds,
                "engineer_seconds": r.engineer_seconds,
                "next_set_seconds": r.next_set_seconds,
                "wrong_auto_wafers": list(o.wrong_auto_wafers),
            }
        )
    wafers = sum(r.outcome.wafers for r in rows)
    errors = sum(r.outcome.auto_errors for r in rows)
    engineer = sum(r.outcome.engineer for r in rows)
    return {
        "sets": sets,
        "wafers": wafers,
        "engineer_labels": engineer,
        "engineer_share": engineer / wafers if wafers else None,
        "true_accuracy": 1 - errors / wafers if wafers else None,
        "sets_below_target": sum(not r.promise_met for r in rows),
    }


def _row_json(row: SetRow) -> dict[str, Any]:
    return dataclasses.asdict(row.outcome) | {
        "engineer_ratio": row.outcome.engineer_ratio,
        "accuracy": row.outcome.accuracy,
        "engineer_seconds": row.engineer_seconds,
        "next_set_seconds": row.next_set_seconds,
    }


def _job_cell(job: float | None, read: float | None, ahead: float | None) -> str:
    if job is None:
        return "-"
    notes = [f"{read:.0f} s"] if read is not None else []
    if ahead is not None:
        notes.append(f"ahead {ahead:.0f} s")
    return f"{job:.0f} s" + (f" ({'; '.join(notes)})" if notes else "")


def results_table(rows: list[SetRow]) -> str:
    """The per-set table and the totals, as Markdown."""
    lines = [
        "| set | wafers | engineer labels | audit wafers | audited auto-label accuracy "
        "| auto labels | wrong auto labels | accuracy | promise | model version "
        "| last label -> next set ready | model accuracy | retraining (train) "
        "| retraining job (label read; read ahead) | opening |",
        "|---:|---:|---:|---:|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        o = r.outcome
        a = r.audit
        audited = str(a.audited) if a is not None else "-"
        if a is not None and a.accuracy is not None:
            low, high = a.accuracy_interval
            audit_accuracy = f"{a.accuracy:.2%} ({low:.2%}-{high:.2%})"
        else:
            audit_accuracy = "-"
        lines.append(
            f"| {o.set_number} | {o.wafers} | {o.engineer} ({o.engineer_ratio:.1%}) | {audited} "
            f"| {audit_accuracy} | {o.auto} | {o.auto_errors} | {o.accuracy:.2%} "
            f"| {'met' if r.promise_met else 'MISSED'} | {o.model_version} "
            f"| {'-' if r.next_set_seconds is None else f'{r.next_set_seconds:.1f} s'} "
            f"| {'-' if o.model_accuracy is None else f'{o.model_accuracy:.2%}'} "
            f"| {'-' if r.retrain_seconds is None else f'{r.retrain_seconds:.0f} s'} "
            f"| {_job_cell(r.retraining_job_seconds, r.label_read_seconds, r.read_ahead_seconds)} "
            f"| {'-' if r.opening_seconds is None else f'{r.opening_seconds:.0f} s'} |"
        )
    wafers = sum(r.outcome.wafers for r in rows)
    engineer = sum(r.outcome.engineer for r in rows)
    errors = sum(r.outcome.auto_errors for r in rows)
    if wafers:
        lines.append(
            f"| all | {wafers} | {engineer} ({engineer / wafers:.1%}) "
            f"| {sum(r.audit.audited for r in rows if r.audit is not None)} | "
            f"| {sum(r.outcome.auto for r in rows)} | {errors} | {1 - errors / wafers:.2%} "
            f"| {sum(r.promise_met for r in rows)} of {len(rows)} met | | | | | | |"
        )
    return "\n".join(lines) + "\n"


def _print_login(
    url: str,
    admin: Credentials,
    engineer: Credentials,
    project: int,
    views: dict[str, int] | Any,
    out: Path,
    say: Callable[[str], None],
) -> None:
    say("")
    say(f"Label Studio: {url}/projects/{project}/data?tab={views[ENGINEER_VIEW]}")
    say(
        f"  log in as {admin.email} / {admin.password}  (or {engineer.email} / {engineer.password})"
    )
    say(f"  the '{ENGINEER_VIEW}' tab lists the wafers waiting for engineers")
    say(f"  logins are in {out / 'logins.json'}; logs: {out}/*.log, label-studio/label-studio.log")
    say("")


def _stop_on_signals() -> None:
    """Ctrl-C and `kill` both stop every process the demo started (a shell may start it with
    SIGINT ignored, e.g. in the background)."""

    def stop(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


def main_demo(
    config: DemoConfig, settings: Settings, labels: LabelConfig, wafers: WaferMaps
) -> int:
    _stop_on_signals()
    rows = run_demo(config, settings, labels, wafers, lambda s: print(s, file=sys.stderr))
    if rows:
        print(results_table(rows))
    return 0
