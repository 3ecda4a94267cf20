"""Integration fixtures: ONE embedded PostgreSQL for the whole session, a fresh database per test.

``pg_server`` starts pgserver once (a few hundred ms); ``pg_url`` hands each test its own
database, cloned from a template that already has the ledger's migrations (CREATE DATABASE
… TEMPLATE is ~0.1 s, far cheaper than a server per test).
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.kotak_rest import KotakRestFake

_db_ids = itertools.count(1)
TEMPLATE = "np_template"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Any]:
    import psycopg

    from services.execution.embedded_pg import start_embedded
    from services.execution.ledger import PgOrderStore

    # Outside pytest's tmp tree: pytest keeps that 0700, and postgres runs as the `pgserver`
    # user when the tests run as root, so it could not reach its own data directory.
    parent = Path(tempfile.mkdtemp(prefix="neopulse-pg-"))
    db = start_embedded(parent / "pgdata", cleanup_mode="delete")
    with psycopg.connect(db.url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {TEMPLATE}")
    tmpl = PgOrderStore(_with_db(db.url, TEMPLATE))
    tmpl.migrate()
    tmpl.close()
    try:
        yield db
    finally:
        db.close()
        shutil.rmtree(parent, ignore_errors=True)


def _with_db(url: str, name: str) -> str:
    """``postgresql://postgres:@/postgres?host=...`` with another database name."""
    head, _, query = url.partition("?")
    base = head.rsplit("/", 1)[0]
    return f"{base}/{name}" + (f"?{query}" if query else "")


@contextmanager
def cloned_db(pg_server: Any, name: str) -> Iterator[str]:
    """The URL of database ``name``, a clone of the migrated template (for a module-scoped
    stack; a crashed run's leftover is dropped first), dropped again afterwards."""
    import psycopg

    with psycopg.connect(pg_server.url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
    try:
        yield _with_db(pg_server.url, name)
    finally:
        with psycopg.connect(pg_server.url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def pg_url(pg_server: Any) -> Iterator[str]:
    """A fresh, migrated database for this test."""
    import psycopg

    name = f"np_t{os.getpid()}_{next(_db_ids)}"
    with psycopg.connect(pg_server.url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
    yield _with_db(pg_server.url, name)
    with psycopg.connect(pg_server.url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[KotakRestFake]:
    """The Kotak REST fake, running, with its state in this test's tmp dir (the SFeed tests
    define their own ``fake``)."""
    with KotakRestFake(tmp_path / "kotak-state.json") as running:
        yield running


@pytest.fixture
def empty_pg_url(pg_server: Any) -> Iterator[str]:
    """A fresh database without the ledger's tables (for migration tests)."""
    import psycopg

    name = f"np_e{os.getpid()}_{next(_db_ids)}"
    with psycopg.connect(pg_server.url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield _with_db(pg_server.url, name)
    with psycopg.connect(pg_server.url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
