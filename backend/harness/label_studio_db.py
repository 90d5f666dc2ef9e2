"""Label Studio's database: PostgreSQL when one answers, SQLite where none does.

Layer L1 (psycopg and a PostgreSQL server). Label Studio's own docs put SQLite at tens of
thousands of tasks and PostgreSQL beyond 100,000; a WM-811K project holds 811,457 wafers, so the
local stack runs Label Studio on PostgreSQL whenever it can and says which database it used.

`choose_database(data_dir, choice)` decides once per Label Studio data dir and remembers the
decision in `<data_dir>/database.json` (mode 0600: it holds the database password), so a reused
data dir reconnects to the same database, and its admin token (kept in that database) stays valid:

- ``"auto"`` (the default): PostgreSQL through the admin connection
  `DEFAULT_ADMIN_URL` (or `WAFER_POSTGRES_ADMIN_URL` as passed by the caller) when it answers and
  may create roles and databases; else SQLite, with the reason in `LabelStudioDatabase.note`.
- ``"postgresql"``: the same, but a PostgreSQL that cannot be used is an error.
- ``"sqlite"``: SQLite in the data dir.
- a ``postgresql://user:password@host:port/dbname`` URL: that admin connection (must work).

Each data dir gets its own role and database, both named ``wafermap_<hash of the data dir>``
with a random password. A data dir that already holds a SQLite database and no `database.json`
keeps SQLite: an existing install never moves silently. A database of that name left behind by
a data dir that was deleted (a demo wipes its folder) is dropped and made again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import psycopg
from psycopg import sql

from backend.files import atomic_write_text

#: The admin connection tried by "auto": the `postgres` superuser on loopback (trust or
#: password-less setups, e.g. the project machines and `docker run -e POSTGRES_HOST_AUTH_METHOD=trust`).
DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DATABASE_FILE = "database.json"
SQLITE_FILE = "label_studio.sqlite3"
CONNECT_TIMEOUT_S = 3


class DatabaseError(RuntimeError):
    """PostgreSQL was asked for and cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class LabelStudioDatabase:
    """Where one Label Studio keeps its data."""

    kind: Literal["postgresql", "sqlite"]
    name: str
    host: str = ""
    port: int = 0
    user: str = ""
    password: str = ""
    #: Why SQLite was chosen under "auto" (empty otherwise).
    note: str = ""

    def environment(self) -> dict[str, str]:
        """The variables that point `label-studio` at this database."""
        if self.kind == "sqlite":
            return {"DJANGO_DB": "sqlite", "DATABASE_NAME": self.name}
        return {
            "DJANGO_DB": "default",
            "POSTGRE_NAME": self.name,
            "POSTGRE_USER": self.user,
            "POSTGRE_PASSWORD": self.password,
            "POSTGRE_HOST": self.host,
            "POSTGRE_PORT": str(self.port),
        }

    def describe(self) -> str:
        """One line for logs and the demo: which database, where."""
        if self.kind == "sqlite":
            return f"SQLite {self.name}" + (f" ({self.note})" if self.note else "")
        return f"PostgreSQL database {self.name} on {self.host}:{self.port}"


def database_name(data_dir: Path) -> str:
    """The role and database name of a data dir: stable for the same resolved path."""
    digest = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:12]
    return f"wafermap_{digest}"


def _sqlite(data_dir: Path, note: str = "") -> LabelStudioDatabase:
    return LabelStudioDatabase(kind="sqlite", name=str(data_dir / SQLITE_FILE), note=note)


def _admin_connection(admin_url: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(admin_url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)


def _create(data_dir: Path, admin_url: str) -> LabelStudioDatabase:
    """A new role and database for `data_dir` (an old pair of the same name is dropped first)."""
    name = database_name(data_dir)
    password = secrets.token_urlsafe(24)
    with _admin_connection(admin_url) as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))
        admin.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(name), sql.Literal(password)
            )
        )
        admin.execute(
            sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(name), sql.Identifier(name)
            )
        )
        info = admin.info
        host, port = info.host, info.port
    # A unix-socket admin connection reports a directory as its host; Label Studio uses TCP.
    if host.startswith("/"):
        host = "127.0.0.1"
    return LabelStudioDatabase(
        kind="postgresql", name=name, host=host, port=port, user=name, password=password
    )


def choose_database(
    data_dir: Path, choice: str = "auto", admin_url: str | None = None
) -> LabelStudioDatabase:
    """The database the Label Studio of `data_dir` runs on (see the module docstring)."""
    saved = data_dir / DATABASE_FILE
    if saved.is_file():
        return LabelStudioDatabase(**json.loads(saved.read_text()))
    if choice == "sqlite":
        return _sqlite(data_dir)
    if choice not in ("auto", "postgresql") and not choice.startswith(
        ("postgresql://", "postgres://")
    ):
        raise DatabaseError(
            f"unknown Label Studio database {choice!r}: use auto, sqlite, postgresql "
            "or a postgresql://user:password@host:port/dbname admin URL"
        )
    if choice == "auto" and (data_dir / SQLITE_FILE).is_file():
        return _sqlite(data_dir, note="this data dir already holds a SQLite database")
    url = choice if choice.startswith("postgres") else (admin_url or DEFAULT_ADMIN_URL)
    try:
        database = _create(data_dir, url)
    except psycopg.Error as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = _where(url)
        if choice == "auto":
            return _sqlite(data_dir, note=f"no usable PostgreSQL at {where}: {reason}")
        raise DatabaseError(
            f"cannot create Label Studio's database on PostgreSQL at {where}: {reason}. "
            "Start PostgreSQL (see README) or pass an admin URL that may create roles "
            "and databases"
        ) from exc
    data_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved, json.dumps(asdict(database)), mode=0o600)
    return database


def drop_database(
    database: LabelStudioDatabase, data_dir: Path, admin_url: str | None = None
) -> None:
    """Remove a PostgreSQL database and role made by `choose_database` (tests' throw-away
    servers); SQLite files go with their data dir. Call it after Label Studio stopped."""
    if database.kind != "postgresql":
        return
    with _admin_connection(admin_url or DEFAULT_ADMIN_URL) as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database.name))
        )
        admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(database.user)))
    with contextlib.suppress(FileNotFoundError):
        (data_dir / DATABASE_FILE).unlink()


def _where(url: str) -> str:
    """host:port of a PostgreSQL URL, without user or password."""
    info = psycopg.conninfo.conninfo_to_dict(url)
    return f"{info.get('host') or 'localhost'}:{info.get('port') or 5432}"
