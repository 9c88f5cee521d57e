"""Deployments: the UI parameters, the debounced S3 trigger (served for real), prefect.yaml,
and work pools created on a real Prefect server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote_plus

import pymupdf
import pytest
import yaml
from pydantic import TypeAdapter
from sqlalchemy import select
from typer.testing import CliRunner

from flows.deployments import CPU_POOL, GPU_POOL, build_deployments
from infra.db.models import SourceObject
from infra.db.session import session_scope
from infra.s3 import s3_client
from infra.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_deployments_offer_ui_parameters_schedule_and_trigger():
    deployments = build_deployments(["s3://archive/incoming/"], "*/5 * * * *")
    by_name = {deployment.name: deployment for deployment in deployments}
    ingest, watch, s3_events = by_name["ingest"], by_name["watch"], by_name["s3-events"]
    assert {"sources", "policy", "mode"} <= set(ingest._parameter_openapi_schema.properties)
    assert watch.parameters == {"prefixes": ["s3://archive/incoming/"]}
    assert watch.schedules[0].schedule.cron == "*/5 * * * *"
    [trigger] = s3_events.triggers
    assert trigger.expect == {"ocrflow.s3.object.created", "ocrflow.s3.sweep.registered"}
    assert trigger.for_each == {"ocrflow.s3.bucket"}
    assert trigger.within.total_seconds() == trigger.schedule_after.total_seconds() == 60


def test_prefect_yaml_entrypoints_and_triggers_are_valid():
    from prefect.events import DeploymentTriggerTypes
    from prefect.flows import load_flow_from_entrypoint

    config = yaml.safe_load((REPO_ROOT / "infra/deploy/prefect.yaml").read_text())
    pools = set()
    for deployment in config["deployments"]:
        load_flow_from_entrypoint(str(REPO_ROOT / deployment["entrypoint"]))
        pools.add(deployment["work_pool"]["name"])
        for trigger in deployment.get("triggers", []):
            TypeAdapter(DeploymentTriggerTypes).validate_python(trigger)
    assert pools == {CPU_POOL, GPU_POOL}


def test_pools_create_is_idempotent(prefect_server):
    from prefect.client.orchestration import get_client

    from flows.cli import app

    runner = CliRunner()
    first = runner.invoke(app, ["pools", "create", "--gpu-slots", "2"])
    again = runner.invoke(app, ["pools", "create"])
    assert first.exit_code == again.exit_code == 0, first.output + again.output
    assert "ocrflow-gpu: created" in first.output and "ocrflow-gpu: exists" in again.output
    with get_client(sync_client=True) as client:
        assert client.read_work_pool(GPU_POOL).concurrency_limit == 2
        assert client.read_work_pool(CPU_POOL).type == "process"


@pytest.mark.slow
def test_served_trigger_processes_a_burst_in_one_debounced_run(
    postgres_url, prefect_server, s3_bucket, tmp_path
):
    """Serve the deployments for real; a burst of events starts one run for the bucket."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.settings import PREFECT_API_URL

    from services.event_intake import EventIntake

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    env["OCRFLOW_DATABASE_URL"] = postgres_url
    log = (tmp_path / "serve.log").open("w")
    served = subprocess.Popen(
        [sys.executable, "-c", "from flows.cli import app; app()", "serve", "--debounce", "5"],
        cwd=REPO_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        with get_client(sync_client=True) as client:
            _wait_for(lambda: _has_deployment(client, "ingest-s3-objects/s3-events"), 120)
            time.sleep(2)  # the trigger's automation is created right after the deployment

            keys = [f"burst/{i}.pdf" for i in range(3)]
            intake = EventIntake(Settings(database_url=postgres_url), source="test")
            for key in keys:
                s3_client().put_object(Bucket=s3_bucket, Key=key, Body=_text_pdf(key))
            for key in keys:  # a burst, well inside the debounce window
                intake.accept(_created_event(s3_bucket, key))

            _wait_for(lambda: _statuses(postgres_url, s3_bucket) == ["done"] * 3, 240)
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["s3-events"]))
            )
            bucket_runs = [run for run in runs if run.parameters.get("bucket") == s3_bucket]
            assert len(bucket_runs) == 1
    finally:
        served.terminate()
        served.wait(30)
        log.close()


def _has_deployment(client, name: str) -> bool:
    from prefect.exceptions import ObjectNotFound

    try:
        client.read_deployment_by_name(name)
    except ObjectNotFound:
        return False
    return True


def _statuses(database_url: str, bucket: str) -> list[str]:
    with session_scope(database_url) as session:
        return list(
            session.scalars(select(SourceObject.status).where(SourceObject.bucket == bucket))
        )


def _wait_for(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s")
        time.sleep(1)


def _text_pdf(title: str) -> bytes:
    document = pymupdf.open()
    document.new_page().insert_text((72, 72), f"{title}\nA typed record for the trigger test.")
    return document.tobytes()


def _created_event(bucket: str, key: str) -> str:
    record = {
        "eventName": "ObjectCreated:Put",
        "s3": {"bucket": {"name": bucket}, "object": {"key": quote_plus(key)}},
    }
    return json.dumps({"Records": [record]})
