"""Keys and locks that cannot stall the loop, against a real Redis and real processes.

A dead holder is a real process killed with SIGKILL (or an rq job that failed in a real
in-process rq worker), never a flag set by the test.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from redis import Redis
from rq import Queue, SimpleWorker, get_current_job
from rq.job import Job, JobStatus

from backend import loop_keys
from backend.harness.stack import log_tail, running_worker, wait_for_worker
from backend.loop_keys import (
    EVENTS_QUEUE,
    LOCK_TTL_S,
    SWEEP_DUE_KEY,
    SWEEP_JOB,
    TRAINING_QUEUE,
    LockLostError,
    heartbeat_key,
    job_alive,
    job_heartbeat,
    known_projects,
    lock_key,
    project_lock,
    release_if_stale,
    request_advance,
    request_retrain,
    request_sweep,
    retrain_job_id,
    retrain_key,
    retrain_pending,
    stale_lock,
)
from backend.reconcile import repair_keys, sweep
from tests.conftest import TEST_REDIS_URL

REPO = Path(__file__).resolve().parent.parent

#: A child that takes the project lock (or a job heartbeat), says so, and waits to be killed.
HOLDER = """
import sys, time
from redis import Redis
from backend.loop_keys import job_heartbeat, project_lock
redis = Redis.from_url(sys.argv[1])
what, arg = sys.argv[2], sys.argv[3]
if what == "lock":
    with project_lock(redis, int(arg)):
        print("held", flush=True)
        time.sleep(600)
else:
    with job_heartbeat(redis, arg):
        print("held", flush=True)
        time.sleep(600)
"""


@contextmanager
def holder(what: str, arg: str) -> Iterator[subprocess.Popen[str]]:
    """A real process holding the lock of project `arg` ("lock") or job `arg`'s heartbeat."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, TEST_REDIS_URL, what, arg],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "held"
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def kill(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


def started(redis: Redis, job_id: str, *, ago: float) -> Job:
    """An rq job recorded as started `ago` seconds ago (as a worker leaves it)."""
    job = Job.create("backend.jobs.retrain_job", args=(5, 2), id=job_id, connection=redis)
    job.started_at = datetime.now(UTC) - timedelta(seconds=ago)
    job.set_status(JobStatus.STARTED)
    job.save()
    return job


# ---- is a job alive ----------------------------------------------------------------------------


def test_a_queued_job_is_alive_and_a_failed_or_vanished_one_is_not(redis: Redis) -> None:
    assert request_retrain(redis, 5, 2)
    job_id = retrain_job_id(5, 2)
    assert job_alive(redis, job_id) and retrain_pending(redis, 5, 2)
    job = Job.fetch(job_id, connection=redis)
    job.set_status(JobStatus.FAILED)
    assert not job_alive(redis, job_id) and not retrain_pending(redis, 5, 2)
    job.delete()
    assert not job_alive(redis, job_id)


def test_a_started_job_lives_as_long_as_its_process(redis: Redis) -> None:
    started(redis, "j1", ago=3600)
    assert not job_alive(redis, "j1")  # started an hour ago, no heartbeat: dead
    started(redis, "j2", ago=1)
    assert job_alive(redis, "j2")  # just started: time to set its heartbeat
    with holder("heartbeat", "j1") as process:
        assert job_alive(redis, "j1")
        ttl: Any = redis.ttl(heartbeat_key("j1"))
        assert 0 < ttl <= loop_keys.HEARTBEAT_TTL_S
        kill(process)
    # The key outlives the killed process by up to its expiry; the dead pid is seen at once.
    assert redis.exists(heartbeat_key("j1"))
    assert not job_alive(redis, "j1")


def test_a_heartbeat_from_another_machine_counts_until_it_expires(redis: Redis) -> None:
    started(redis, "j3", ago=3600)
    redis.set(heartbeat_key("j3"), "another-host|1", ex=60)
    assert job_alive(redis, "j3")
    redis.delete(heartbeat_key("j3"))
    assert not job_alive(redis, "j3")


def test_a_heartbeat_ends_with_its_block(redis: Redis) -> None:
    with job_heartbeat(redis, "j4"):
        who = redis.get(heartbeat_key("j4"))
        assert who == f"{socket.gethostname()}|{os.getpid()}".encode()
    assert not redis.exists(heartbeat_key("j4"))


# ---- the retrain key ---------------------------------------------------------------------------


def test_a_retrain_key_of_a_dead_job_is_taken_over(redis: Redis) -> None:
    assert request_retrain(redis, 5, 2)
    assert not request_retrain(redis, 5, 2)
    # The worker running it was killed: rq shows it started an hour ago, nothing beats.
    Queue(TRAINING_QUEUE, connection=redis).remove(retrain_job_id(5, 2))
    started(redis, retrain_job_id(5, 2), ago=3600)
    assert request_retrain(redis, 5, 2)
    queue = Queue(TRAINING_QUEUE, connection=redis)
    assert queue.job_ids == [retrain_job_id(5, 2)]
    assert Job.fetch(retrain_job_id(5, 2), connection=redis).get_status() == JobStatus.QUEUED
    assert redis.ttl(retrain_key(5, 2)) == -1  # held for as long as its job lives


def test_a_claim_being_enqueued_is_not_stale(redis: Redis) -> None:
    redis.set(retrain_key(5, 2), retrain_job_id(5, 2), ex=30)
    assert release_if_stale(redis, retrain_key(5, 2)) is None
    assert not request_retrain(redis, 5, 2)


def test_a_lost_retrain_key_of_a_running_job_is_not_enqueued_twice(redis: Redis) -> None:
    # Redis lost the key (a restart) while the job runs and beats: no second retraining.
    with holder("heartbeat", retrain_job_id(5, 2)):
        assert not request_retrain(redis, 5, 2)
        assert redis.get(retrain_key(5, 2)) == retrain_job_id(5, 2).encode()
        assert Queue(TRAINING_QUEUE, connection=redis).count == 0


def test_a_retraining_that_cannot_open_its_workbench_gives_its_key_back(
    redis: Redis, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A labeling config that cannot be read: Workbench.open fails before any training starts.
    monkeypatch.setenv("LABEL_STUDIO_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "token")
    monkeypatch.setenv("LABEL_CONFIG", str(tmp_path / "missing.xml"))
    monkeypatch.setenv("MODEL_DIR", str(tmp_path))
    assert request_retrain(redis, 5, 2)
    queue = Queue(TRAINING_QUEUE, connection=redis)
    SimpleWorker([queue], connection=redis).work(burst=True)
    job = Job.fetch(retrain_job_id(5, 2), connection=redis)
    assert job.get_status() == JobStatus.FAILED
    assert not redis.exists(retrain_key(5, 2))
    assert not redis.exists(heartbeat_key(job.id))
    # The next request retrains again, under the same job id, known to rq once.
    assert request_retrain(redis, 5, 2)
    assert queue.job_ids == [retrain_job_id(5, 2)]


# ---- the project lock --------------------------------------------------------------------------


def test_a_lock_held_by_a_killed_process_is_broken_at_once(redis: Redis) -> None:
    with holder("lock", "3") as process:
        ttl: Any = redis.ttl(lock_key(3))
        assert 0 < ttl <= LOCK_TTL_S
        assert stale_lock(redis, 3) is None  # the holder lives
        kill(process)
    got = threading.Event()

    def take() -> None:
        with project_lock(redis, 3):
            got.set()

    taker = threading.Thread(target=take, daemon=True)
    taker.start()
    taker.join(timeout=60)
    assert got.is_set(), "the lock of a killed holder blocked the next one"
    assert not redis.exists(lock_key(3))


def test_a_lock_of_a_holder_elsewhere_stays_until_it_expires(redis: Redis) -> None:
    redis.set(lock_key(3), "another-host|1||abc", px=LOCK_TTL_S * 1000)
    assert stale_lock(redis, 3) is None
    # An older backend's lock (6 hours) or one without expiry is broken.
    redis.set(lock_key(3), "d1a2b3", ex=6 * 3600)
    assert stale_lock(redis, 3) == "d1a2b3"
    redis.set(lock_key(3), "d1a2b3")
    assert stale_lock(redis, 3) == "d1a2b3"


def test_a_held_lock_is_renewed_past_its_expiry(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loop_keys, "LOCK_TTL_S", 1)
    with project_lock(redis, 3):
        value = redis.get(lock_key(3))
        threading.Event().wait(2.5)  # more than twice the expiry
        assert redis.get(lock_key(3)) == value
        assert stale_lock(redis, 3) is None
    assert not redis.exists(lock_key(3))


def test_a_holder_that_lost_the_lock_stops_at_its_next_step(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loop_keys, "LOCK_TTL_S", 1)
    leaving = pytest.raises(LockLostError, match="stopping before leaving the project lock")
    with leaving, project_lock(redis, 3) as held:
        held.check("step 1")  # held: nothing raised
        # Paused past the expiry: the key expired and the next job took it.
        redis.set(lock_key(3), "other-host|1|job-2|abc", ex=15)
        with pytest.raises(LockLostError, match=r"stopping before step 2: .*lost the project"):
            held.check("step 2")
        assert held.lost
    # The next holder's lock is left alone.
    assert redis.get(lock_key(3)) == b"other-host|1|job-2|abc"


def test_the_renewing_thread_notices_a_lost_lock(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loop_keys, "LOCK_TTL_S", 1)
    with pytest.raises(LockLostError), project_lock(redis, 3) as held:
        redis.delete(lock_key(3))
        threading.Event().wait(1.0)  # three renewals' time
        assert held.lost  # seen by the thread, before any check
    assert not redis.exists(lock_key(3))


#: rq job for the test below: take project 7's lock with a 2-s expiry (in the work horse
#: only), say so, wait for the test's "go", then do its next step, checking the lock first.
def hold_lock_then_step() -> str:
    job = get_current_job()
    assert job is not None
    redis = job.connection
    loop_keys.LOCK_TTL_S = 2
    with project_lock(redis, 7, job.id) as held:
        redis.set("test:held-by", os.getpid())
        while not redis.exists("test:go"):
            time.sleep(0.05)
        held.check("the job's next step")
        redis.set("test:stepped", "1")  # what the job must not do beside the next holder
    return "done"


def test_a_worker_paused_past_the_lock_expiry_stops_instead_of_working_beside_the_next(
    redis: Redis, tmp_path: Path
) -> None:
    """A real rq worker whose work horse holds the project lock is paused (SIGSTOP) past the
    lock's expiry; the next job takes the lock; the paused one resumes. Before: it went on
    with its step beside the new holder (only a log line said the lock was not renewed)."""
    with running_worker({}, TEST_REDIS_URL, [EVENTS_QUEUE], tmp_path / "worker.log") as worker:
        wait_for_worker(TEST_REDIS_URL, [EVENTS_QUEUE], 60, pid=worker.pid)
        job = Queue(EVENTS_QUEUE, connection=redis).enqueue(f"{__name__}.hold_lock_then_step")
        deadline = time.monotonic() + 60
        while not redis.exists("test:held-by"):
            assert time.monotonic() < deadline, log_tail(tmp_path / "worker.log")
            time.sleep(0.1)
        held_by: Any = redis.get("test:held-by")
        horse = int(held_by)
        os.kill(horse, signal.SIGSTOP)
        try:
            time.sleep(3)  # past the 2-s expiry: the key is gone
            with project_lock(redis, 7):  # the next job holds the lock
                os.kill(horse, signal.SIGCONT)
                redis.set("test:go", "1")
                deadline = time.monotonic() + 60
                while job.get_status(refresh=True) not in (JobStatus.FINISHED, JobStatus.FAILED):
                    assert time.monotonic() < deadline, log_tail(tmp_path / "worker.log")
                    time.sleep(0.1)
                assert not redis.exists("test:stepped"), "it worked beside the next holder"
        finally:
            with contextlib.suppress(ProcessLookupError):  # it may have ended already
                os.kill(horse, signal.SIGCONT)
    assert job.get_status(refresh=True) == JobStatus.FAILED
    result = job.latest_result()
    assert result is not None and "LockLostError" in str(result.exc_string)
    assert "stopping before the job's next step" in str(result.exc_string)


# ---- the periodic sweep -----------------------------------------------------------------------


def test_projects_are_known_from_redis_and_from_the_model_dir(redis: Redis, tmp_path: Path) -> None:
    assert known_projects(redis, tmp_path) == []
    assert request_advance(redis, 4)
    (tmp_path / "projects" / "9" / "wafers").mkdir(parents=True)
    (tmp_path / "projects" / "notes").mkdir()
    assert known_projects(redis, tmp_path) == [4, 9]
    redis.flushdb()  # a lost Redis: MODEL_DIR still knows its projects
    assert known_projects(redis, tmp_path) == [9]


def test_one_sweep_is_enqueued_per_interval_whatever_the_number_of_workers(
    redis: Redis,
) -> None:
    queue = Queue(EVENTS_QUEUE, connection=redis)
    assert request_sweep(redis, 60)
    assert not request_sweep(redis, 60)  # another worker, the same interval
    assert [job.func_name for job in queue.jobs] == [SWEEP_JOB]
    # The interval passed but the last sweep still waits (every worker busy): no pile-up.
    redis.delete(SWEEP_DUE_KEY)
    assert not request_sweep(redis, 60)
    assert queue.count == 1
    assert not request_sweep(redis, 0)  # off


def test_the_sweep_advances_every_known_project_and_forgets_deleted_ones(
    redis: Redis, tmp_path: Path
) -> None:
    assert request_advance(redis, 4)
    (tmp_path / "projects" / "9").mkdir(parents=True)
    (tmp_path / "projects" / "12").mkdir(parents=True)
    redis.sadd("wafermap:projects", "12")
    outcome = sweep(redis, tmp_path, exists=lambda project: project != 12)
    assert outcome == {"advanced": [9], "pending": [4], "gone": [12]}
    assert known_projects(redis) == [4, 9]
    assert [job.args for job in Queue(EVENTS_QUEUE, connection=redis).jobs] == [
        (4, False),
        (9, False),
    ]


def test_a_wafer_worker_enqueues_the_sweep_from_its_own_heartbeat(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    from backend.jobs import WaferWorker  # torch: only for this test

    monkeypatch.setenv("WAFER_RECONCILE_INTERVAL_S", "1")
    queue = Queue(EVENTS_QUEUE, connection=redis)
    worker = WaferWorker([queue], connection=redis)
    assert worker.dequeue_timeout == 1  # an idle worker wakes up every interval
    worker.heartbeat()
    assert queue.count == 0  # the first sweep is due one interval after the start
    time.sleep(1.1)
    worker.heartbeat()
    assert [job.func_name for job in queue.jobs] == [SWEEP_JOB]
    monkeypatch.setenv("WAFER_RECONCILE_INTERVAL_S", "0")
    assert WaferWorker([queue], connection=redis).dequeue_timeout > 1


# ---- reconcile's Redis repairs ----------------------------------------------------------------


def test_repair_keys_reports_each_repair(redis: Redis) -> None:
    assert repair_keys(redis, 5) == []
    assert request_retrain(redis, 5, 1)
    Queue(TRAINING_QUEUE, connection=redis).remove(retrain_job_id(5, 1))
    started(redis, retrain_job_id(5, 1), ago=3600)
    assert request_retrain(redis, 5, 2)  # alive (queued): stays
    redis.set(lock_key(5), "d1a2b3", ex=6 * 3600)
    repaired = repair_keys(redis, 5)
    assert len(repaired) == 2, repaired
    assert any("set 1" in line and retrain_job_id(5, 1) in line for line in repaired)
    assert any("lock" in line for line in repaired)
    assert not redis.exists(retrain_key(5, 1)) and not redis.exists(lock_key(5))
    assert redis.exists(retrain_key(5, 2))
    assert repair_keys(redis, 5) == []
