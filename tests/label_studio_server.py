"""Start a real Label Studio server for integration tests (a helper, not a test module).

`running_label_studio(data_dir)` starts `label-studio start` from the virtualenv that runs the
tests, headless, bound to 127.0.0.1 on a free port, with a preset admin user whose legacy API
token is known, waits for `/health` and stops the server (terminate, then kill) on exit.

The credentials live in `<data_dir>/test-credentials.json`, written on the first start: Label
Studio creates the admin (and sets its token) only once per database, so a data dir that is
reused must keep the same token. A first start runs the SQLite migrations (about 45 s on a
2-core machine); a restart with the same data dir answers in about 7 s.

`create_user(server, email, password, token)` adds a second user (an engineer) with its own
legacy token through `label-studio init`, which works while the server runs.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

CREDENTIALS_FILE = "test-credentials.json"
LOG_FILE = "label-studio.log"
ADMIN_EMAIL = "admin@example.com"
#: Environment prefixes Label Studio reads; inherited ones are dropped so a developer's own
#: settings cannot leak into the test server.
_LS_ENV_PREFIXES = ("LABEL_STUDIO_", "HEARTEX_", "DJANGO_")
#: Plain names that Label Studio's `get_env` also falls back to.
_LS_PLAIN_NAMES = ("USERNAME", "PASSWORD", "USER_TOKEN", "HOST", "PORT")


class LabelStudioStartError(RuntimeError):
    """The server did not come up (or a CLI call failed); the message carries the log tail."""


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

    @property
    def api_key(self) -> str:
        """The admin's legacy token (accepted as `Authorization: Token ...`)."""
        return self.admin.token


def label_studio_executable() -> Path:
    """`label-studio` from the virtualenv that runs this interpreter."""
    exe = Path(sys.executable).parent / "label-studio"
    if not exe.is_file():
        raise LabelStudioStartError(
            f"no label-studio executable beside {sys.executable}; install label-studio==1.23.2"
        )
    return exe


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def load_or_create_credentials(data_dir: Path) -> Credentials:
    """The admin credentials of this data dir, made up (and saved) on first use."""
    path = data_dir / CREDENTIALS_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        return Credentials(email=saved["email"], password=saved["password"], token=saved["token"])
    creds = Credentials(
        email=ADMIN_EMAIL, password=secrets.token_urlsafe(16), token=secrets.token_hex(20)
    )
    data_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(creds.__dict__))
    path.chmod(0o600)
    return creds


def server_environment(data_dir: Path, files_root: Path, admin: Credentials) -> dict[str, str]:
    """The environment `label-studio` runs with (see docs/label-studio-facts.md)."""
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
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def log_tail(path: Path, lines: int = 40) -> str:
    """The last `lines` lines of a log file ('' when there is none)."""
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _health_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2.0) as response:
            status: int = response.status
            return status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def stop_process(process: subprocess.Popen[bytes], grace_seconds: float = 15.0) -> None:
    """Terminate the process group the server leads, then kill it if it lingers."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=grace_seconds)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        process.wait(timeout=grace_seconds)


@contextmanager
def running_label_studio(data_dir: Path, *, timeout: float = 180.0) -> Iterator[LabelStudioServer]:
    """Start Label Studio on a free loopback port with `data_dir` as its home; stop it on exit.

    Reusing a `data_dir` reuses its database and admin credentials (fast restart).
    Raises LabelStudioStartError with the server's log tail when `/health` does not answer
    within `timeout` seconds or the process exits early.
    """
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    files_root = data_dir / "files"
    files_root.mkdir(exist_ok=True)
    admin = load_or_create_credentials(data_dir)
    port = free_port()
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
    started = time.monotonic()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            env=server_environment(data_dir, files_root, admin),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=data_dir,
            start_new_session=True,
        )
    try:
        while not _health_ok(url):
            if process.poll() is not None:
                raise LabelStudioStartError(
                    f"label-studio exited with code {process.returncode} before /health "
                    f"answered on {url}; log tail ({log_path}):\n{log_tail(log_path)}"
                )
            if time.monotonic() - started > timeout:
                raise LabelStudioStartError(
                    f"label-studio did not answer {url}/health within {timeout:.0f} s; "
                    f"log tail ({log_path}):\n{log_tail(log_path)}"
                )
            time.sleep(0.5)
        yield LabelStudioServer(
            url=url,
            admin=admin,
            data_dir=data_dir,
            files_root=files_root,
            log_path=log_path,
            startup_seconds=time.monotonic() - started,
        )
    finally:
        stop_process(process)


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
    env = server_environment(server.data_dir, server.files_root, server.admin)
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
        raise LabelStudioStartError(
            f"label-studio init for {email} failed with code {result.returncode}:\n{tail}"
        )
    return Credentials(email=email, password=password, token=token)
