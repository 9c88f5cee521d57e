"""Process defaults for ocrflow, applied before Prefect or PyMuPDF is imported, and the names the
deployments and the CLI share (kept here, free of Prefect imports, so the CLI starts fast).

Telemetry off (the machines running archives often have no way out, and should not try), and a
patient start-up for Prefect's ephemeral server on small machines. PyMuPDF's messages (MuPDF's
complaints about a damaged file) go to Python logging instead of stdout, where they would corrupt
`--json` output; this reaches the CPU worker processes too, which inherit the environment.
Users' own settings win.
"""

from __future__ import annotations

import os

DEFAULTS = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "HF_HUB_OFFLINE": "1",
    "PYMUPDF_MESSAGE": "logging:name=pymupdf,level=30",
    "PYMUPDF_LOG": "logging:name=pymupdf,level=10",
}

CPU_POOL = "ocrflow-cpu"  # sweeps and event intake: S3 listing and database work
GPU_POOL = "ocrflow-gpu"  # anything that OCRs: the model stays resident in the worker
DEFAULT_DEBOUNCE_SECONDS = 60
DEFAULT_WATCH_CRON = "*/15 * * * *"


def apply_prefect_defaults() -> None:
    for name, value in DEFAULTS.items():
        os.environ.setdefault(name, value)
