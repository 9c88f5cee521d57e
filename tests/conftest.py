"""Fixtures for the real services: Postgres (a fresh database per test session), SQLite files,
Prefect (a temporary server through `prefect_test_harness`)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

# Before Prefect is imported anywhere: no telemetry, no outside connections, patient start-up.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import psycopg
import pytest

from infra.db.migrate import upgrade

POSTGRES_ADMIN_URL = os.environ.get(
    "OCRFLOW_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLES_DIR = REPO_ROOT / "samples"


def _create_database() -> tuple[str, str]:
    name = f"ocrflow_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    return name, f"{base}/{name}"


def _drop_database(name: str) -> None:
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh, migrated Postgres database for this test session, dropped afterwards."""
    name, url = _create_database()
    try:
        upgrade(url)
        yield url
    finally:
        from infra.db.session import get_engine

        get_engine(url).dispose()
        _drop_database(name)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'ocrflow.db'}"
    upgrade(url)
    return url


@pytest.fixture(params=["postgres", "sqlite"])
def database_url(request: pytest.FixtureRequest) -> str:
    """Runs a test against both stores."""
    if request.param == "postgres":
        return request.getfixturevalue("postgres_url")
    return request.getfixturevalue("sqlite_url")


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    """A real, temporary Prefect server for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield
