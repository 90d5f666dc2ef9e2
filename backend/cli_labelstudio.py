"""The Label Studio commands of the CLI: setup-project, import-sets, status, retrain. Layer L3."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from redis import Redis

from backend.classifier import pick_device
from backend.jobs import request_advance
from backend.label_config import LabelConfig
from backend.labelstudio import LabelStudioClient
from backend.model_store import ModelStore
from backend.ops import project_id, project_status, status_table, wire_project
from backend.settings import Settings
from backend.sources import load_wafers
from backend.wafer_sets import import_sets, plan_sets, write_truth


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
            for title, view in wiring.views.items():
                print(f"view {view}: {title}")
            return 0
        project = project_id(client, args.project)
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
            imported = import_sets(client, project, plan, labels, args.only, report=_say)
            total = sum(len(ids) for ids in imported.values())
            print(f"imported {total} wafers into project {project}; truth in {args.truth}")
            return 0
        if args.command == "status":
            store = ModelStore(settings.model_dir, pick_device("cpu"))
            states, versions = project_status(client, store, project)
            print(status_table(states, versions))
            return 0
        queued = request_advance(Redis.from_url(settings.redis_url), project)
        print("queued" if queued else "a step is already queued", f"for project {project}")
        return 0
