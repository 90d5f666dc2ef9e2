"""The README's own-Label-Studio route, in the README's order, as a new user runs it.

The backend (gunicorn) and one rq worker are started first, as the README starts them; then the
commands, each a `python -m backend` process: `setup-project`, `import-wafers --initial` (the
labelled history as set 0), `train --from-project` (the first model, offline), `import-wafers`
of new wafers without labels, `status`. Before: the worker, already running when the history
arrived, trained its own first model on the part of set 0 it saw, `train` then stopped with
"model version v001-set0 exists already", the weak model was served, and the "Auto labels" tab
listed the imported history. Now ops's model is served, whatever the worker did meanwhile, and
the tab lists accepted predictions only. (The small models here are sure of most wafers; an engineer labels the rest.)
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from redis import Redis

from backend.harness.simulated_engineers import label_uncertain, wait_until_idle
from backend.harness.stack import (
    LabelStudioServer,
    create_user,
    free_port,
    running_backend,
    running_worker,
    wait_for_worker,
)
from backend.jobs import WORKER_CLASS
from backend.label_config import LabelConfig
from backend.labelstudio import LabelStudioClient
from backend.loop_keys import QUEUES
from backend.model_store import ModelStore
from backend.projects import AUTO_VIEW, lookup_project_id, set_counts
from backend.sources.arrays import save_npz
from backend.sources.cache import LoadReport
from backend.splits import stratified_sample
from backend.wafer_store import WaferStore
from backend.wafers import WaferMaps
from tests.conftest import E2E_REDIS_URL

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
TITLE = "Wafer maps"
TIMEOUT_S = 600


def _command(env: dict[str, str], *args: str) -> str:
    """One `python -m backend` command as the README runs it; its output (it must succeed)."""
    done = subprocess.run(
        [sys.executable, "-m", "backend", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, f"{args[0]} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _views(client: LabelStudioClient, project: int) -> dict[str, int]:
    found = client._sdk.views.list(project=project)
    return {str((v.data or {}).get("title")): int(v.id) for v in found if v.id is not None}


def test_the_readme_route_in_its_order_serves_ops_first_model(
    label_studio: LabelStudioServer,
    real_wafers: tuple[WaferMaps, LoadReport],
    label_config: LabelConfig,
    tmp_path: Path,
) -> None:
    wafers = real_wafers[0]
    rng = np.random.default_rng(17)
    labelled = np.flatnonzero(wafers.labels >= 0)
    history = labelled[stratified_sample(wafers.labels[labelled], 0.0012, rng)]
    rest = rng.permutation(np.setdiff1d(labelled, history))[:40]
    history_file, new_file = tmp_path / "history.npz", tmp_path / "new-wafers.npz"
    save_npz(wafers.subset(np.sort(history)), history_file)
    new = wafers.subset(np.sort(rest))
    save_npz(dataclasses.replace(new, labels=np.full(len(new), -1, np.int16)), new_file)

    redis_url = E2E_REDIS_URL.rsplit("/", 1)[0] + "/12"  # a database of its own
    redis = Redis.from_url(redis_url)
    redis.flushdb()
    tag = uuid.uuid4().hex[:8]
    auto = create_user(label_studio, f"auto-labeler-{tag}@example.com", secrets.token_urlsafe(12))
    env = {
        **os.environ,
        "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": auto.token,
        "REDIS_URL": redis_url,
        "MODEL_DIR": str(tmp_path / "models"),
        "WAFER_CACHE_DIR": str(tmp_path / "cache"),
        "WAFER_BACKBONE": "resnet18",
        "WAFER_IMAGE_SIZE": "16",
        "WAFER_EPOCHS": "1",
        "WAFER_DEVICE": "cpu",
        # Both routes on a one-epoch model (calibration on a few dozen held-out wafers would
        # rightly send every wafer to engineers); sets of 20: no audits.
        "WAFER_ROUTE_MEASURE": "least-confidence",
        "WAFER_ROUTE_THRESHOLD": "0.7",
        "WAFER_AUDIT_FRACTION": "0",
        "WAFER_RECONCILE_INTERVAL_S": "0",
    }
    port = free_port()
    with (
        running_backend(env, port, tmp_path / "backend.log") as backend_url,
        running_worker(env, redis_url, QUEUES, tmp_path / "worker.log", worker_class=WORKER_CLASS),
    ):
        wait_for_worker(redis_url, QUEUES, timeout=60)
        _command(env, "setup-project", "--title", f"{TITLE} {tag}", "--backend-url", backend_url)
        title = f"{TITLE} {tag}"
        _command(env, "import-wafers", "--project", title, "--data", str(history_file), "--initial")
        trained = _command(
            env,
            "train",
            "--project",
            title,
            "--from-project",
            "--epochs",
            "2",
            "--batch-size",
            "32",
        )
        _command(
            env, "import-wafers", "--project", title, "--data", str(new_file), "--per-set", "20"
        )
        with LabelStudioClient.connect(label_studio.url, auto.token) as client:
            project = lookup_project_id(client, title)
            wait_until_idle(redis, project, TIMEOUT_S)
            # an engineer labels what the models were unsure of, set by set
            truth = {
                int(w): new.classes[int(c)] for w, c in zip(new.source_row, new.labels, strict=True)
            }
            with LabelStudioClient.connect(label_studio.url, label_studio.api_key) as person:
                for number in (1, 2):
                    label_uncertain(person, project, number, truth, label_config)
                    wait_until_idle(redis, project, TIMEOUT_S)
            status = _command(env, "status", "--project", title)
            store = ModelStore.for_project(tmp_path / "models", project, torch.device("cpu"))
            offline = next(v for v in store.versions() if v in trained)
            card = store.card(offline)
            assert "offline" in card.training and card.trained_through_set == 0
            # ops's offline model opened set 1, whatever the worker trained meanwhile; set 1's
            # model (continued from it) opened set 2
            wafer_store = WaferStore.for_project(tmp_path / "models", project)
            one = next(r for r in wafer_store.routings() if r.set_number == 1)
            assert one.model_version == offline, (trained, store.versions())
            two = next(r for r in wafer_store.routings() if r.set_number == 2)
            second = store.card(two.model_version)
            assert second.trained_through_set == 1 and second.training["warm_start"]
            served = store.current_version()
            states = set_counts(client, project, client.current_user_id(), served)
            assert sorted(states) == [0, 1, 2]
            assert states[0].known == states[0].total == len(history)
            assert states[1].total == states[2].total == 20
            assert one.auto + one.engineer == 20 and states[1].auto == one.auto, status
            assert states[1].waiting == states[2].waiting == 0
            # the Auto labels tab lists the accepted predictions, not the imported history
            listed: list[dict[str, Any]] = client.tasks(
                project, view=_views(client, project)[AUTO_VIEW]
            )
            assert len(listed) == states[1].auto + states[2].auto > 0
            assert f"| 1 | 20 | {states[1].auto} |" in status
