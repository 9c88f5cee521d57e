"""Wall time of the README's main command, `ocrflow ingest samples/`, on embedded defaults.

    python bench/main_command.py

Runs the command as a newcomer would (a fresh SQLite file, a fresh Prefect home, so Prefect's
ephemeral server starts from scratch) and records the wall time, the pages per route and the
time per page in bench/results/main_command.json.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULT_PATH = REPO_ROOT / "bench" / "results" / "main_command.json"


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="ocrflow-bench-") as tmp:
        env = {
            **os.environ,
            "OCRFLOW_DATABASE_URL": f"sqlite:///{tmp}/ocrflow.db",
            "PREFECT_HOME": f"{tmp}/prefect",
        }
        env.pop("PREFECT_API_URL", None)
        command = [sys.executable, "-m", "flows.cli", "ingest", "samples/", "--json"]
        started = time.perf_counter()
        run = subprocess.run(
            command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True
        )
        wall_s = time.perf_counter() - started
        stats = subprocess.run(
            [sys.executable, "-m", "flows.cli", "stats", "--json"],
            cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
    outcomes = json.loads(run.stdout)
    pages = json.loads(stats.stdout)["pages"]
    result = {
        "date": dt.date.today().isoformat(),
        "command": "ocrflow ingest samples/ (fresh SQLite file and Prefect home)",
        "reproduce": "python bench/main_command.py",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "documents": len(outcomes),
        "statuses": sorted({o["status"] for o in outcomes}),
        "pages": pages["total"],
        "pages_by_route": pages["by_route"],
        "wall_s": round(wall_s, 1),
    }
    print(json.dumps(result, indent=2))
    RESULT_PATH.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
