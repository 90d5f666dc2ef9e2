"""Label Studio's database: PostgreSQL on the machine's server when it answers, SQLite otherwise."""

from __future__ import annotations

import json
import os
from pathlib import Path

import psycopg
import pytest
import yaml

from backend.harness.label_studio_db import (
    DATABASE_FILE,
    DEFAULT_ADMIN_URL,
    SQLITE_FILE,
    DatabaseError,
    LabelStudioDatabase,
    choose_database,
    database_name,
    drop_database,
)
from backend.harness.stack import Credentials, free_port, server_environment
from backend.settings import REPO_ROOT


def _postgres_answers() -> bool:
    try:
        with psycopg.connect(DEFAULT_ADMIN_URL, connect_timeout=3):
            return True
    except psycopg.Error:
        return False


def test_a_data_dir_has_one_stable_database_name(tmp_path: Path) -> None:
    assert database_name(tmp_path / "a") == database_name(tmp_path / "a" / ".." / "a")
    assert database_name(tmp_path / "a") != database_name(tmp_path / "b")
    assert database_name(tmp_path / "a").startswith("wafermap_")


def test_sqlite_when_asked_and_its_environment(tmp_path: Path) -> None:
    db = choose_database(tmp_path, "sqlite")
    assert db.kind == "sqlite" and db.name == str(tmp_path / SQLITE_FILE)
    assert db.environment() == {"DJANGO_DB": "sqlite", "DATABASE_NAME": str(tmp_path / SQLITE_FILE)}
    assert "SQLite" in db.describe()


def test_an_unknown_choice_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DatabaseError, match="unknown Label Studio database 'mysql'"):
        choose_database(tmp_path, "mysql")


def test_auto_falls_back_to_sqlite_with_the_reason_when_no_postgres_answers(tmp_path: Path) -> None:
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    db = choose_database(tmp_path, "auto", admin_url=dead)
    assert db.kind == "sqlite"
    assert "no usable PostgreSQL at 127.0.0.1:" in db.note
    assert not (tmp_path / DATABASE_FILE).exists()


def test_postgresql_that_cannot_be_used_is_an_error_naming_where(tmp_path: Path) -> None:
    port = free_port()
    with pytest.raises(DatabaseError, match=f"127.0.0.1:{port}") as caught:
        choose_database(tmp_path, f"postgresql://postgres:secret@127.0.0.1:{port}/postgres")
    assert "secret" not in str(caught.value)


def test_an_existing_sqlite_install_is_not_moved(tmp_path: Path) -> None:
    (tmp_path / SQLITE_FILE).write_bytes(b"")
    db = choose_database(tmp_path, "auto")
    assert db.kind == "sqlite" and "already holds a SQLite database" in db.note


def test_the_server_environment_points_label_studio_at_the_database(tmp_path: Path) -> None:
    admin = Credentials("a@example.com", "pw", "t" * 40)
    pg = LabelStudioDatabase("postgresql", "wafermap_x", "127.0.0.1", 5432, "wafermap_x", "pw")
    env = server_environment(tmp_path, tmp_path / "files", admin, pg)
    assert env["DJANGO_DB"] == "default" and env["POSTGRE_NAME"] == "wafermap_x"
    assert env["POSTGRE_PORT"] == "5432" and "DATABASE_NAME" not in env
    env = server_environment(tmp_path, tmp_path / "files", admin)
    assert env["DJANGO_DB"] == "sqlite" and "POSTGRE_NAME" not in env


def test_label_studio_sends_no_error_reports_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Label Studio's own settings lookup finds no Sentry address to report errors to (its
    default is its vendor's), even where the caller's environment names one."""
    from label_studio.core.utils.params import get_env

    monkeypatch.setenv("SENTRY_DSN", "https://key@sentry.example.com/1")
    env = server_environment(tmp_path, tmp_path / "files", Credentials("a@b.c", "pw", "t" * 40))
    for key in list(os.environ):
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert get_env("SENTRY_DSN", "https://vendor@o1.ingest.sentry.io/2") == ""
    assert get_env("FRONTEND_SENTRY_DSN", "https://vendor@o1.ingest.sentry.io/3") == ""


def test_postgres_database_is_made_remembered_usable_and_dropped(tmp_path: Path) -> None:
    assert _postgres_answers(), f"the machine's PostgreSQL is expected at {DEFAULT_ADMIN_URL}"
    db = choose_database(tmp_path, "auto")
    try:
        assert db.kind == "postgresql" and db.name == database_name(tmp_path)
        saved = tmp_path / DATABASE_FILE
        assert json.loads(saved.read_text())["password"] == db.password
        assert saved.stat().st_mode & 0o077 == 0
        # The decision is kept: the same data dir gets the same database and password.
        assert choose_database(tmp_path, "auto") == db
        with psycopg.connect(
            host=db.host, port=db.port, user=db.user, password=db.password, dbname=db.name
        ) as own:
            own.execute("CREATE TABLE t (x int)")
            own.commit()
        # A data dir wiped and made again gets a fresh database, not the old tables.
        saved.unlink()
        again = choose_database(tmp_path, "auto")
        with psycopg.connect(
            host=again.host,
            port=again.port,
            user=again.user,
            password=again.password,
            dbname=again.name,
        ) as own:
            tables = own.execute("SELECT to_regclass('public.t')").fetchone()
        assert tables == (None,)
    finally:
        drop_database(choose_database(tmp_path, "auto"), tmp_path)
    with psycopg.connect(DEFAULT_ADMIN_URL) as admin:
        left = admin.execute(
            "SELECT count(*) FROM pg_database WHERE datname = %s", (db.name,)
        ).fetchone()
    assert left == (0,)
    assert not (tmp_path / DATABASE_FILE).exists()


def test_docker_compose_runs_label_studio_on_its_postgres_service() -> None:
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    ls_env = services["label-studio"]["environment"]
    assert ls_env["DJANGO_DB"] == "default" and ls_env["POSTGRE_HOST"] == "postgres"
    assert ls_env["POSTGRE_NAME"] == services["postgres"]["environment"]["POSTGRES_DB"]
    assert ls_env["POSTGRE_USER"] == services["postgres"]["environment"]["POSTGRES_USER"]
    depends = services["label-studio"]["depends_on"]["postgres"]
    assert depends["condition"] == "service_healthy"
    assert "postgres-data:/var/lib/postgresql/data" in services["postgres"]["volumes"]
