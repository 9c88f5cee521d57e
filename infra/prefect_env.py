"""Prefect defaults for ocrflow processes, applied before Prefect is imported.

Telemetry off (the machines running archives often have no way out, and should not try), and a
patient start-up for Prefect's ephemeral server on small machines. Users' own settings win.
"""

from __future__ import annotations

import os

DEFAULTS = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "HF_HUB_OFFLINE": "1",
}


def apply_prefect_defaults() -> None:
    for name, value in DEFAULTS.items():
        os.environ.setdefault(name, value)
