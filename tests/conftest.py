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

import pytest

# psycopg and the migrations (alembic) are imported inside the fixtures that use them, so the
# model tests also run where the database stack is not installed (the GPU machine).

POSTGRES_ADMIN_URL = os.environ.get(
    "OCRFLOW_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLES_DIR = REPO_ROOT / "samples"
# Copies of ../shared/reference (official config, tensor manifest, parity golden set), so a clean
# clone tests against them; OCRFLOW_REFERENCE_DIR points elsewhere.
REFERENCE_DIR = Path(
    os.environ.get("OCRFLOW_REFERENCE_DIR", REPO_ROOT / "tests" / "data" / "reference")
)
PARITY_DIR = REFERENCE_DIR / "parity"
OFFICIAL_DIR = REFERENCE_DIR / "deepseek-ocr"


def _create_database() -> tuple[str, str]:
    import psycopg

    name = f"ocrflow_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    return name, f"{base}/{name}"


def _drop_database(name: str) -> None:
    import psycopg

    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """A fresh, migrated Postgres database for this test session, dropped afterwards."""
    from infra.db.migrate import upgrade

    name, url = _create_database()
    try:
        upgrade(url)
        yield url
    finally:
        from infra.db.session import get_engine

        get_engine(url).dispose()
        _drop_database(name)


@pytest.fixture
def postgres_url(postgres_database: str) -> str:
    """The session's Postgres database, emptied for this test."""
    from sqlalchemy import text

    from infra.db.models import Base
    from infra.db.session import POSTGRES_SCHEMA, get_engine

    tables = ", ".join(f"{POSTGRES_SCHEMA}.{name}" for name in Base.metadata.tables)
    with get_engine(postgres_database).begin() as connection:
        connection.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    return postgres_database


@pytest.fixture
def settings(tmp_path: Path):
    """Settings for work that touches no database (split, render, OCR on files)."""
    from infra.settings import Settings

    return Settings(database_url=f"sqlite:///{tmp_path / 'unused.db'}", data_dir=tmp_path)


@pytest.fixture(scope="session")
def rapidocr():
    """The CPU engine, loaded once (its ONNX sessions take seconds)."""
    from models.rapidocr_engine import RapidOcrEngine

    return RapidOcrEngine()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    from infra.db.migrate import upgrade

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
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny-config DeepSeek-OCR checkpoint with formula weights, in the official layout."""
    import torch

    from models.deepseek_ocr.checkpoint import save_checkpoint
    from models.deepseek_ocr.config import DeepseekOcrConfig
    from models.deepseek_ocr.modeling import DeepseekOcrForCausalLM

    config = DeepseekOcrConfig.tiny()
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in DeepseekOcrForCausalLM(config).state_dict().items()}
    directory = tmp_path_factory.mktemp("tiny-deepseek-ocr")
    save_checkpoint(directory, config, shapes)
    return directory


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    """A real, temporary Prefect server for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's S3 and SQS API over HTTP on loopback, found by boto3 through AWS_ENDPOINT_URL.

    Set in the environment (not passed to clients), so subprocesses and flow runs see it too.
    """
    import socket

    from moto.server import ThreadedMotoServer

    from infra.s3 import reset_clients

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ENDPOINT_URL", endpoint)
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.delenv("AWS_PROFILE", raising=False)
        reset_clients()
        try:
            yield endpoint
        finally:
            server.stop()
            reset_clients()


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A new, empty bucket on the test S3 server."""
    from infra.s3 import s3_client

    name = f"ocrflow-test-{uuid.uuid4().hex[:12]}"
    s3_client().create_bucket(Bucket=name)
    return name


def url_new_to_this_process(url: str, request: pytest.FixtureRequest) -> str:
    """The same database under a URL this process has not used before: `QueueEngine`
    remembers a give-up per database URL for the life of the process. A SQLite test file is
    new anyway; Postgres gets a distinct connection parameter."""
    if url.startswith("sqlite"):
        return url
    return f"{url}?application_name={request.node.name[:60]}"


def source_versions(settings, bucket: str) -> list:
    """The S3 registry's rows for a bucket, by key then registration order."""
    from sqlalchemy import select

    from infra.db.models import SourceObject
    from infra.db.session import session_scope

    with session_scope(settings.database_url) as session:
        return list(
            session.scalars(
                select(SourceObject)
                .where(SourceObject.bucket == bucket)
                .order_by(SourceObject.key, SourceObject.id)
            )
        )
