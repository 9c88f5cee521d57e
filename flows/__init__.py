"""Prefect flows, deployments and the `ocrflow` CLI."""

from infra.prefect_env import apply_prefect_defaults

apply_prefect_defaults()
