"""docker-compose.yml keeps the job queue's Redis to the loop: rq stores its jobs as pickles, so
whoever can write to Redis runs code in the worker (issue 15 row 20). Redis takes a password from
a required variable, the backend and the worker get it inside their Redis URL (the worker never on
its command line), and Redis shares no network with Label Studio, which calls URLs its users set.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
COMPOSE = REPO_ROOT / "docker-compose.yml"
REQUIRED = {
    "LABEL_STUDIO_PASSWORD": "a-password",
    "LABEL_STUDIO_API_KEY": "0123456789abcdef0123456789abcdef01234567",
    "POSTGRES_PASSWORD": "pg-password",
    "REDIS_PASSWORD": "0123456789abcdef",
    "BASIC_AUTH_USER": "ml",
    "BASIC_AUTH_PASS": "basic-password",
}


def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(loaded, dict)
    return loaded


def networks_of(service: dict[str, Any]) -> set[str]:
    found = service.get("networks")
    assert found, "every service names its networks (none would mean the shared default)"
    return set(found)


def test_redis_takes_a_password_from_a_required_variable() -> None:
    services = compose()["services"]
    command = services["redis"]["command"]
    assert "--requirepass" in command
    password = command[command.index("--requirepass") + 1]
    assert re.fullmatch(r"\$\{REDIS_PASSWORD:\?[^}]+\}", password), password
    assert "REDISCLI_AUTH" in services["redis"]["environment"]  # the health check logs in
    assert "ports" not in services["redis"]


def test_the_backend_and_the_worker_reach_redis_with_the_password_off_the_command_line() -> None:
    services = compose()["services"]
    for name in ("backend", "worker", "setup"):
        env = services[name]["environment"]
        for key in ("REDIS_URL", "RQ_REDIS_URL"):
            assert env[key].startswith("redis://:${REDIS_PASSWORD:?"), (name, key, env[key])
            assert env[key].endswith("@redis:6379/0")
    worker = services["worker"]["command"]
    assert worker[:2] == ["rq", "worker"] and "--url" not in worker and "-u" not in worker
    assert "backend.jobs.WaferWorker" in worker


def test_redis_shares_no_network_with_label_studio() -> None:
    services = compose()["services"]
    redis = networks_of(services["redis"])
    label_studio = networks_of(services["label-studio"])
    assert not redis & label_studio, (redis, label_studio)
    for name in ("backend", "worker"):
        mine = networks_of(services[name])
        assert mine & redis, f"{name} must reach Redis"
        assert mine & label_studio, f"{name} and Label Studio must reach each other"
    assert networks_of(services["postgres"]) <= label_studio
    assert set(compose()["networks"]) >= redis | label_studio


def test_the_docs_say_what_redis_access_means() -> None:
    text = (REPO_ROOT / "docs" / "docker.md").read_text()
    assert "REDIS_PASSWORD=$(openssl rand -hex 20)" in text
    assert "pickle" in text and "run any code in the worker" in text


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="no docker-compose here")
def test_compose_parses_with_the_required_variables_and_refuses_without_the_redis_password(
    tmp_path: Path,
) -> None:
    # Compose v1 does not know the top-level `name:` (v2 does): check a copy without it.
    text = "".join(
        line
        for line in COMPOSE.read_text().splitlines(keepends=True)
        if not line.startswith("name:")
    )
    (tmp_path / "docker-compose.yml").write_text(text)
    base = {k: v for k, v in os.environ.items() if k not in REQUIRED}

    def config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["docker-compose", "config", "-q"],
            cwd=tmp_path,
            env=base | env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    ok = config(REQUIRED)
    assert ok.returncode == 0, ok.stderr
    refused = config({k: v for k, v in REQUIRED.items() if k != "REDIS_PASSWORD"})
    assert refused.returncode != 0 and "REDIS_PASSWORD" in refused.stderr
