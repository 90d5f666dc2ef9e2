"""The loop's bookkeeping in Redis: queue names, keys, exactly-once enqueueing, and the proof
that a job is still alive. Layer L1 (Redis + rq).

Exactly once: a retraining for (project, set) is enqueued only by whoever wins a Redis
``SET NX`` on its key, so repeated or concurrent webhooks cannot enqueue a second one.
Advancing is debounced the same way with a short-lived key that the job clears when it starts.

Nothing here can stall the loop when a worker dies (SIGKILL, the OOM killer, a lost machine):

- the retrain key names its rq job, and counts only while that job lives: queued, or started
  and still renewing its heartbeat key (`job_heartbeat`, a few seconds' expiry renewed by a
  thread of the job itself). A key whose job failed, stopped, finished, vanished or stopped
  beating is stale, and the next request for that set replaces it (`release_if_stale`);
- the project lock (`project_lock`) expires after `LOCK_TTL_S` unless its holder renews it, so
  a killed holder blocks the next advance for seconds, not hours; a holder that was paused
  longer than that (SIGSTOP, swapping, a stalled VM) finds out at its next step
  (`HeldLock.check` raises `LockLostError`) instead of working beside the next holder;
- every project the loop heard of is remembered (`remember_project`), and the workers ask for a
  sweep of all of them every `WAFER_RECONCILE_INTERVAL_S` (`request_sweep`), so a lost webhook
  costs one interval, not forever;
- Redis itself holds only hints: the loop's truth is in Label Studio and MODEL_DIR, and
  `backend.reconcile` rebuilds whatever Redis lost.

Jobs are enqueued by their dotted name (``backend.jobs.advance_job``), so this module does not
import the job code (and torch) to queue work.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from redis import Redis
from redis.exceptions import LockError, LockNotOwnedError, RedisError
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

log = logging.getLogger(__name__)

EVENTS_QUEUE = "wafermap-events"
TRAINING_QUEUE = "wafermap-training"
QUEUES = (EVENTS_QUEUE, TRAINING_QUEUE)
#: How long a retraining may run before rq stops it.
RETRAIN_TIMEOUT_S = 6 * 3600
#: How long an "advance pending" mark lives if its job never starts (a dead worker).
ADVANCE_DEBOUNCE_S = 600
#: The rq entry points (see backend.jobs).
ADVANCE_JOB = "backend.jobs.advance_job"
RETRAIN_JOB = "backend.jobs.retrain_job"
READ_AHEAD_JOB = "backend.jobs.read_ahead_job"
#: How long a read ahead of the labels may run before rq stops it.
READ_AHEAD_TIMEOUT_S = 3600
#: Expiry of a running job's heartbeat key and of the project lock; both are renewed every
#: third of it by the job that holds them, so a dead holder is noticed within this many seconds.
HEARTBEAT_TTL_S = 15
LOCK_TTL_S = 15
#: How long a claim on a retrain key lives before its job is enqueued.
CLAIM_TTL_S = 30
#: rq statuses of a job that waits for a worker (alive although nothing runs it yet).
WAITING = frozenset({JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED})
#: The periodic reconcile of every known project (see backend.jobs.sweep_job).
SWEEP_JOB = "backend.jobs.sweep_job"
#: How long a sweep may run before rq stops it (it only asks for one advance per project).
SWEEP_TIMEOUT_S = 600
#: Redis set of every project id the loop heard of (a hint: MODEL_DIR's stores count too).
KNOWN_PROJECTS_KEY = "wafermap:projects"
#: Redis key that one worker takes (with an expiry of one interval) to enqueue the next sweep.
SWEEP_DUE_KEY = "wafermap:sweep:due"
#: Redis key naming the last sweep job enqueued (a new one waits while it lives).
SWEEP_JOB_KEY = "wafermap:sweep:job"


def retrain_key(project: int, set_number: int) -> str:
    return f"wafermap:project:{project}:retrain:set:{set_number}"


def advance_key(project: int) -> str:
    return f"wafermap:project:{project}:advance-pending"


def full_advance_key(project: int) -> str:
    """Set while a full advance was asked for (anything but a person's label): the queued
    advance then does its whole pass even if it was queued by a label."""
    return f"wafermap:project:{project}:advance-full"


def waiting_key(project: int) -> str:
    """ "SET:VERSION" while the last full advance found the set open, every wafer of it tried by
    VERSION, and engineers labelling: a label's advance then only checks that the set still
    has a wafer waiting (`backend.jobs.advance`, light)."""
    return f"wafermap:project:{project}:waiting"


def opened_key(project: int) -> str:
    """Redis hash: set number -> the model version that pre-annotated all of it."""
    return f"wafermap:project:{project}:opened"


def lock_key(project: int) -> str:
    return f"wafermap:project:{project}:lock"


def retrain_job_id(project: int, set_number: int) -> str:
    return f"wafermap-retrain-p{project}-set{set_number}"


#: The id of every read ahead of the labels starts so (`read_ahead_job_id`).
READ_AHEAD_PREFIX = "wafermap-read-ahead-"


def read_ahead_job_id(project: int, set_number: int) -> str:
    return f"{READ_AHEAD_PREFIX}{project}-{set_number}"


def heartbeat_key(job_id: str) -> str:
    return f"wafermap:job:{job_id}:alive"


# ---- is a job alive? ----------------------------------------------------------------------------


def job_alive(redis: Redis, job_id: str) -> bool:
    """Whether rq's job `job_id` still waits for a worker or still runs.

    A job whose heartbeat key exists is alive while its process is (a process on another
    machine counts as alive until the key expires), even when Redis lost rq's record of it (a
    restarted Redis: the job's renewal sets the key again). Otherwise waiting (queued, deferred,
    scheduled) counts as alive, and a started job only for `HEARTBEAT_TTL_S` after it started
    (the time to set that key). A job that finished, failed, was stopped or canceled, or that
    Redis no longer knows, is not.
    """
    beat = redis.get(heartbeat_key(job_id))
    if beat is not None and process_alive(beat.decode() if isinstance(beat, bytes) else str(beat)):
        return True  # it runs (this holds even when Redis lost rq's own records of it)
    try:
        job = Job.fetch(job_id, connection=redis)
    except NoSuchJobError:
        return False
    status = job.get_status(refresh=False)
    if status in WAITING:
        return True
    if status != JobStatus.STARTED or beat is not None:
        return False
    started = job.started_at
    if started is None:
        return False
    if started.tzinfo is None:
        started = started.replace(tzinfo=UTC)
    return (datetime.now(UTC) - started).total_seconds() < HEARTBEAT_TTL_S


def this_process() -> str:
    """ "<host>|<pid>": who holds a heartbeat or a lock."""
    return f"{socket.gethostname()}|{os.getpid()}"


def process_alive(who: str) -> bool:
    """Whether the process "<host>|<pid>[|...]" runs. Only a process on this machine can be
    seen to be gone (no such pid, or a zombie); one elsewhere counts as alive (its keys expire)."""
    host, _, rest = who.partition("|")
    pid_text = rest.partition("|")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return True
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


_DELETE_IF_EQUAL = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


def release_if_stale(redis: Redis, key: str) -> str | None:
    """Delete `key` when the job it names is not alive; returns that job id, else None.

    Compare-and-delete: a key that a live job took meanwhile is left alone, and so is a claim
    still being enqueued (it has an expiry).
    """
    value = redis.get(key)
    ttl: Any = redis.ttl(key)
    if value is None or ttl > 0:
        return None
    job_id = value.decode() if isinstance(value, bytes) else str(value)
    if job_alive(redis, job_id):
        return None
    if redis.eval(_DELETE_IF_EQUAL, 1, key, job_id):
        log.warning("released %s: its job %s is no longer alive", key, job_id)
        return job_id
    return None


def release_own(redis: Redis, key: str, job_id: str) -> None:
    """Delete `key` if it still names `job_id` (a job giving back what it held)."""
    redis.eval(_DELETE_IF_EQUAL, 1, key, job_id)


class LockLostError(RuntimeError):
    """The project lock this job held expired and may be held by another job now (this job was
    paused longer than `LOCK_TTL_S`, or Redis lost the key): the job stops instead of working
    beside the next holder; the next advance redoes whatever it did not finish."""


class _Renewer:
    """A daemon thread that calls `renew` every `interval` seconds until stopped."""

    def __init__(self, renew: Callable[[], object], interval: float, what: str) -> None:
        self._renew = renew
        self._interval = interval
        self._what = what
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"renew {what}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._renew()
            except (RedisError, LockError) as exc:
                log.error("could not renew %s: %s", self._what, exc)

    def __enter__(self) -> _Renewer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self._interval + 5)


@contextmanager
def job_heartbeat(redis: Redis, job_id: str | None) -> Iterator[None]:
    """Keep `heartbeat_key(job_id)` alive while the block runs (nothing for None: not a job)."""
    if job_id is None:
        yield
        return
    key = heartbeat_key(job_id)
    who = this_process()
    redis.set(key, who, ex=HEARTBEAT_TTL_S)
    try:
        with _Renewer(lambda: redis.set(key, who, ex=HEARTBEAT_TTL_S), HEARTBEAT_TTL_S / 3, key):
            yield
    finally:
        redis.delete(key)


def lock_owner(job_id: str | None) -> str:
    """The value a holder writes into a lock: "<host>|<pid>|<job id or empty>|<random>"."""
    return f"{this_process()}|{job_id or ''}|{uuid.uuid4().hex}"


def holder_alive(redis: Redis, holder: str) -> bool:
    """Whether the lock holder `holder` (a `lock_owner` value) still runs."""
    parts = holder.split("|")
    if len(parts) != 4:
        return True  # not ours to judge: its expiry decides
    job_id = parts[2]
    return process_alive(holder) and (not job_id or job_alive(redis, job_id))


class HeldLock:
    """A project lock held by this process; `check` between steps says whether it still is."""

    def __init__(self, redis: Redis, project: int, token: str) -> None:
        self.redis = redis
        self.project = project
        self.token = token
        self._lost = threading.Event()
        self._why = ""

    def lose(self, why: str) -> None:
        """Mark the lock lost (the renewing thread found another token, or none)."""
        if not self._lost.is_set():
            self._why = why
            self._lost.set()
            log.error("project %d: the project lock was lost (%s)", self.project, why)

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    def check(self, step: str = "the next step") -> None:
        """Raise `LockLostError` unless this process still holds the lock (one Redis GET).

        Call it before each step that writes (to Label Studio, Redis or MODEL_DIR): a holder
        that was paused past the lock's expiry stops there, before working beside whoever took
        the lock meanwhile."""
        if not self._lost.is_set():
            value = self.redis.get(lock_key(self.project))
            held = value.decode() if isinstance(value, bytes) else value
            if held != self.token:
                self.lose(
                    "held by another job now" if held is not None else "it expired and is free"
                )
        if self._lost.is_set():
            raise LockLostError(
                f"project {self.project}: stopping before {step}: this job lost the project "
                f"lock ({self._why}); it was paused or cut off from Redis for more than "
                f"{LOCK_TTL_S} s, so another job may be working on the project; the next "
                "advance finishes what this one did not"
            )

    def _renew(self, lock: Any) -> None:
        if self._lost.is_set():
            return
        try:
            lock.reacquire()
        except LockNotOwnedError:
            self.lose("it expired before it could be renewed")


@contextmanager
def project_lock(redis: Redis, project: int, job_id: str | None = None) -> Iterator[HeldLock]:
    """One holder per project at a time (blocking until it is free); yields a `HeldLock`.

    The lock expires `LOCK_TTL_S` seconds after its holder stops renewing it (a thread renews
    it every third of that while the block runs), and a waiter breaks it at once when its
    holder is seen dead (`stale_lock`), so a killed holder blocks the next job for seconds.
    A holder paused longer than the expiry has lost the lock: `HeldLock.check` (called between
    steps) raises `LockLostError`, and so does leaving the block when nothing else was raised.
    """
    # thread_local=False: the renewing thread must see the token taken here.
    lock = redis.lock(
        lock_key(project), timeout=LOCK_TTL_S, blocking_timeout=1.0, thread_local=False
    )
    token = lock_owner(job_id)
    while not lock.acquire(blocking=True, token=token):
        stale_lock(redis, project)
    held = HeldLock(redis, project, token)
    failed = False
    try:
        with _Renewer(lambda: held._renew(lock), LOCK_TTL_S / 3, lock_key(project)):
            yield held
    except BaseException:
        failed = True
        raise
    finally:
        try:
            lock.release()
        except LockError:
            held.lose("it had expired before its holder let go")
        if held.lost and not failed:
            held.check("leaving the project lock")


def stale_lock(redis: Redis, project: int) -> str | None:
    """Break the project's lock when nobody can be holding it any more; returns its holder.

    Stale: a lock without expiry or with a longer one than `LOCK_TTL_S` (left by an older
    version of this backend, which kept it for hours), or one whose holder is seen dead.
    """
    key = lock_key(project)
    value = redis.get(key)
    if value is None:
        return None
    holder = value.decode() if isinstance(value, bytes) else str(value)
    ttl: Any = redis.ttl(key)
    stale = ttl == -1 or ttl > LOCK_TTL_S or not holder_alive(redis, holder)
    if stale and redis.eval(_DELETE_IF_EQUAL, 1, key, holder):
        log.warning("broke the stale lock of project %d (held by %s)", project, holder)
        return holder
    return None


def remember_project(redis: Redis, project: int) -> None:
    """Add the project to the ones the periodic sweep reconciles (`known_projects`)."""
    redis.sadd(KNOWN_PROJECTS_KEY, str(project))


def forget_project(redis: Redis, project: int) -> None:
    """Drop a project Label Studio no longer knows from the sweep's Redis hint."""
    redis.srem(KNOWN_PROJECTS_KEY, str(project))


def known_projects(redis: Redis, model_dir: Path | None = None) -> list[int]:
    """Every project the loop heard of (Redis's hint), and, with `model_dir`, every project that
    has a store under MODEL_DIR/projects/ (its wafers or models): the truth survives a lost
    Redis. Ascending."""
    found: set[int] = set()
    for raw in redis.smembers(KNOWN_PROJECTS_KEY):  # type: ignore[union-attr]
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        if text.isdigit() and int(text) >= 1:
            found.add(int(text))
    if model_dir is not None:
        base = Path(model_dir) / "projects"
        if base.is_dir():
            found.update(
                int(p.name) for p in base.iterdir() if p.name.isdigit() and int(p.name) >= 1
            )
    return sorted(found)


def request_sweep(redis: Redis, interval_s: float) -> bool:
    """Enqueue one `sweep_job` if none ran for `interval_s` seconds (across every worker: the
    first to take `SWEEP_DUE_KEY` enqueues it) and the last one no longer waits or runs; True
    when enqueued. Cheap enough for every worker heartbeat (one SET NX when nothing is due)."""
    if interval_s <= 0:
        return False
    if not redis.set(SWEEP_DUE_KEY, this_process(), nx=True, ex=max(1, round(interval_s))):
        return False
    last: Any = redis.get(SWEEP_JOB_KEY)
    if last is not None and job_alive(redis, last.decode() if isinstance(last, bytes) else last):
        return False  # the last sweep still waits for a worker (all busy): no pile-up
    job = Queue(EVENTS_QUEUE, connection=redis).enqueue(
        SWEEP_JOB,
        job_timeout=SWEEP_TIMEOUT_S,
        result_ttl=max(600, round(interval_s) * 2),
        description="reconcile every known project",
    )
    redis.set(SWEEP_JOB_KEY, job.id, ex=max(SWEEP_TIMEOUT_S, round(interval_s)) * 2)
    return True


def request_advance(redis: Redis, project: int, *, light: bool = False) -> bool:
    """Enqueue one `advance_job` for the project unless one is waiting; True when enqueued.
    The project is remembered for the periodic sweep either way.

    `light`: asked for by a person's label, which can only finish the open set. The job then
    first checks whether the set still has a wafer waiting (one query) and stops there if so;
    any other request (a full one) makes the waiting job do its whole pass."""
    remember_project(redis, project)
    if not light:
        redis.set(full_advance_key(project), "1", ex=ADVANCE_DEBOUNCE_S)
    if not redis.set(advance_key(project), "1", nx=True, ex=ADVANCE_DEBOUNCE_S):
        return False
    try:
        Queue(EVENTS_QUEUE, connection=redis).enqueue(
            ADVANCE_JOB,
            project,
            light,
            job_timeout=RETRAIN_TIMEOUT_S,
            description=f"advance project {project}{' (a label)' if light else ''}",
        )
    except BaseException:
        redis.delete(advance_key(project))
        raise
    return True


def request_retrain(redis: Redis, project: int, set_number: int) -> bool:
    """Enqueue the ONE retraining for (project, set); False when it was already requested."""
    key = retrain_key(project, set_number)
    job_id = retrain_job_id(project, set_number)
    # Claimed with an expiry while the job is being enqueued (a claimant that dies here frees
    # the set within seconds), then kept for as long as the job lives.
    won = redis.set(key, job_id, nx=True, ex=CLAIM_TTL_S)
    if not won and release_if_stale(redis, key) is not None:
        won = redis.set(key, job_id, nx=True, ex=CLAIM_TTL_S)
    if not won or job_alive(redis, job_id):
        if won:  # the key was lost while its job lives: give it back to that job
            redis.set(key, job_id)
        return False
    try:
        _forget_dead_job(redis, job_id)
        Queue(TRAINING_QUEUE, connection=redis).enqueue(
            RETRAIN_JOB,
            project,
            set_number,
            job_id=job_id,
            job_timeout=RETRAIN_TIMEOUT_S,
            description=f"retrain project {project} through set {set_number}",
        )
        redis.persist(key)
    except BaseException:
        redis.delete(key)
        raise
    log.info("retraining of project %d through set %d enqueued", project, set_number)
    return True


def request_read_ahead(redis: Redis, project: int, set_number: int) -> bool:
    """Enqueue one `read_ahead_job` for the open set (on the training queue, so that it never
    holds up an advance); False when one for it waits or runs already, or its retraining is
    already asked for (that reads the labels itself)."""
    job_id = read_ahead_job_id(project, set_number)
    if job_alive(redis, job_id) or retrain_pending(redis, project, set_number):
        return False
    _forget_dead_job(redis, job_id)
    Queue(TRAINING_QUEUE, connection=redis).enqueue(
        READ_AHEAD_JOB,
        project,
        set_number,
        job_id=job_id,
        job_timeout=READ_AHEAD_TIMEOUT_S,
        description=f"read the labels of project {project} ahead, through open set {set_number}",
    )
    log.info("read-ahead of project %d's labels through set %d enqueued", project, set_number)
    return True


def _forget_dead_job(redis: Redis, job_id: str) -> None:
    """Delete an earlier run of `job_id` (failed, finished, abandoned) from rq's registries, so
    the job enqueued again under the same id is the only one rq knows."""
    redis.delete(heartbeat_key(job_id))
    try:
        Job.fetch(job_id, connection=redis).delete(remove_from_queue=True)
    except NoSuchJobError:
        return


def retrain_pending(redis: Redis, project: int, set_number: int) -> bool:
    """Whether a LIVE retraining holds the set's key (a stale key does not count)."""
    value = redis.get(retrain_key(project, set_number))
    if value is None:
        return False
    return job_alive(redis, value.decode() if isinstance(value, bytes) else str(value))
