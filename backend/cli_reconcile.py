"""The CLI's `reconcile` command: repair a project's loop by hand. Layer L3.

Runs the same step as every advance job (`backend.jobs.advance`), in this process: repairs
dead retrain keys and stale locks, has Label Studio recount the annotations of wafers whose
count disagrees with their annotations (a label counted as 0 keeps its set open), queues the
retraining of a finished set that no model learnt (the worker trains it), and pre-annotates
open-set wafers that lack a prediction of the served version. Prints what it repaired and each
step. The workers run the same for every known project every WAFER_RECONCILE_INTERVAL_S seconds.
"""

from __future__ import annotations

import json

from redis import Redis

from backend.job_resources import JobResources
from backend.jobs import advance
from backend.labelstudio import LabelStudioClient
from backend.projects import lookup_project_id
from backend.settings import Settings


def run_reconcile(project_ref: str, settings: Settings) -> int:
    """Reconcile the project titled (or numbered) `project_ref`; 0 when it ran."""
    url, key = settings.require_label_studio()
    with LabelStudioClient.connect(url, key) as client:
        project = lookup_project_id(client, project_ref)
    redis = Redis.from_url(settings.redis_url)
    try:
        resources = JobResources.open(settings, redis, project)
        try:
            outcome = advance(resources, project)
        finally:
            resources.close()
    finally:
        redis.close()
    repaired = outcome["repaired"]
    print(f"project {project}: {len(repaired)} repair(s)")
    for line in repaired:
        print(f"  repaired: {line}")
    for step in outcome["steps"]:
        print(f"  step: {json.dumps(step, sort_keys=True)}")
    return 0
