"""Find and repair what a killed worker, a lost webhook or a lost Redis left behind. Layer L2.

Run at the start of every advance job (`backend.jobs.advance`) and by hand as
``python -m backend reconcile --project ...``. Redis holds only hints; the truth is in Label
Studio (which wafers are labelled, which carry a prediction of the served version) and in the
project's model store (what the served model learnt). Repairs here:

- a retrain key whose job is dead (failed, gone, or its process killed): released, so the
  finished set is retrained by the next decision;
- the project lock of a dead holder (or an hours-long lock of an older version): broken;
- rq jobs left "started" by a killed worker: moved to rq's failed registry once rq's own
  heartbeat for them has run out (rq's cleanup).

The decision that follows (`backend.loop_state.decide`, fed from Label Studio) then queues the
retraining of a finished set that no model learnt, and pre-annotates open-set wafers that lack
a prediction of the served version, whatever the Redis "opened" mark says.
"""

from __future__ import annotations

import logging

from redis import Redis
from rq import Queue
from rq.registry import StartedJobRegistry

from backend.loop_keys import QUEUES, release_if_stale, retrain_key, stale_lock

log = logging.getLogger(__name__)


def _set_of(key: str) -> str:
    return key.rsplit(":", 1)[-1]


def repair_keys(redis: Redis, project: int) -> list[str]:
    """Release the project's dead retrain keys and stale lock, and let rq fail the jobs a killed
    worker left started; returns one line per repair (empty when all was well)."""
    repaired: list[str] = []
    for name in QUEUES:
        registry = StartedJobRegistry(queue=Queue(name, connection=redis))
        before = set(registry.get_job_ids(cleanup=False))
        registry.cleanup()
        for job_id in sorted(before - set(registry.get_job_ids(cleanup=False))):
            repaired.append(f"job {job_id} died with its worker: rq marked it failed")
    for raw in redis.scan_iter(match=retrain_key(project, 0).rsplit(":", 1)[0] + ":*"):
        key = raw.decode() if isinstance(raw, bytes) else str(raw)
        dead = release_if_stale(redis, key)
        if dead is not None:
            repaired.append(
                f"set {_set_of(key)}: released the retrain key of dead job {dead} "
                "(the set is retrained again if no model learnt it)"
            )
    holder = stale_lock(redis, project)
    if holder is not None:
        repaired.append(f"broke the project lock of a holder that is gone ({holder})")
    for line in repaired:
        log.warning("project %d: %s", project, line)
    return repaired
