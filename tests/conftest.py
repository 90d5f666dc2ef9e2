"""Shared fixtures: the real WM-811K file, loaded once per test session through the cache."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis

from backend.harness.stack import LabelStudioServer, running_label_studio
from backend.label_config import DEFAULT_LABEL_CONFIG, LabelConfig, parse_label_config
from backend.labelstudio import LabelStudioClient
from backend.settings import DEFAULT_DATA
from backend.sources import load_wafers
from backend.sources.cache import LoadReport
from backend.wafers import WaferMaps


@pytest.fixture(scope="session")
def label_config() -> LabelConfig:
    return parse_label_config(DEFAULT_LABEL_CONFIG.read_text())


@pytest.fixture(scope="session")
def real_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """WAFER_CACHE_DIR when set (scripts/test sets it, so one conversion serves every run)."""
    configured = os.environ.get("WAFER_CACHE_DIR")
    return Path(configured) if configured else tmp_path_factory.mktemp("wafer-cache")


@pytest.fixture(scope="session")
def real_wafers(
    real_cache_dir: Path, label_config: LabelConfig
) -> Iterator[tuple[WaferMaps, LoadReport]]:
    if not DEFAULT_DATA.is_file():
        pytest.fail(f"WM-811K is expected at {DEFAULT_DATA} (the shared data folder)")
    yield load_wafers(DEFAULT_DATA, label_config.failure_types, real_cache_dir, progress=False)


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudioServer]:
    """A real Label Studio 1.23.2 for the session, on the PostgreSQL at 127.0.0.1:5432 when one
    answers (else SQLite; WAFER_LABEL_STUDIO_DB=sqlite|postgresql|auto chooses).
    LABEL_STUDIO_TEST_DATA_DIR keeps its data dir and database for the next run; otherwise the
    PostgreSQL database made for the session is dropped at its end."""
    configured = os.environ.get("LABEL_STUDIO_TEST_DATA_DIR")
    data_dir = Path(configured) if configured else tmp_path_factory.mktemp("label-studio")
    with running_label_studio(
        data_dir,
        database=os.environ.get("WAFER_LABEL_STUDIO_DB", "auto"),
        drop_database_on_exit=not configured,
    ) as server:
        print(f"\nLabel Studio for the tests: {server.url} on {server.database.describe()}")
        yield server


@pytest.fixture(scope="session")
def ls(label_studio: LabelStudioServer) -> Iterator[LabelStudioClient]:
    """The admin's client of that server."""
    with LabelStudioClient.connect(label_studio.url, label_studio.api_key) as client:
        yield client


#: The Redis database unit tests use; flushed before and after each test that takes `redis`.
#: WAFER_TEST_REDIS_URL moves it, so two test runs on one machine do not flush each other's data.
TEST_REDIS_URL = os.environ.get("WAFER_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
#: The Redis database the whole-loop tests give their backend and worker (WAFER_E2E_REDIS_URL).
E2E_REDIS_URL = os.environ.get("WAFER_E2E_REDIS_URL", "redis://127.0.0.1:6379/13")


@pytest.fixture
def redis() -> Iterator[Redis]:
    """A real Redis (the machine's, or the one scripts/test starts), an emptied database."""
    connection = Redis.from_url(TEST_REDIS_URL)
    connection.flushdb()
    yield connection
    connection.flushdb()
    connection.close()
