"""How long pages wait when `OCRFLOW_ENGINE=queue` and no GPU worker is running.

Against a temporary Postgres database (created and dropped by this script), with nobody serving
the queue:

1. a 16-page batch goes through `recognize_isolating_failures` (what the pipeline calls) on the
   queue engine built by the registry from the default settings; measured: enqueue to every
   page reported `EngineUnavailable` (retryable), at the default grace (120 s);
2. a second 16-page batch right after it: the give-up is remembered, so it fails at once.

Baseline (computed, not run: it would take an hour): before this change the batch timed out
with a plain timeout error that the pipeline halved, and every call of the halving tree (2n - 1
calls for n pages) waited the whole grace again; the next batch did the same.

Run: `python bench/queue_no_worker.py [--admin-url postgresql://postgres@127.0.0.1:5432/postgres]
[--grace-seconds S]` (about two minutes). Writes `bench/results/queue_no_worker.json` and prints a
table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from PIL import Image, ImageDraw  # noqa: E402

from infra.db.migrate import upgrade  # noqa: E402
from infra.db.models import OcrJob  # noqa: E402
from infra.db.session import get_engine, session_scope  # noqa: E402
from infra.errors import EngineUnavailable  # noqa: E402
from infra.settings import EngineChoice, Settings  # noqa: E402
from infra.vocabulary import Mode  # noqa: E402
from models.engine import OcrRequest, OcrResult, recognize_isolating_failures  # noqa: E402
from models.registry import build_engine  # noqa: E402

PAGES = 16
RESULT = REPO_ROOT / "bench" / "results" / "queue_no_worker.json"
DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


@contextmanager
def temporary_database(admin_url: str) -> Iterator[str]:
    """A fresh, migrated database on the server of `admin_url`, dropped afterwards."""
    import psycopg

    name = f"ocrflow_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    url = f"{base}/{name}"
    try:
        upgrade(url)
        yield url
    finally:
        get_engine(url).dispose()
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def letter_page(index: int) -> Image.Image:
    """A letter page at 144 dpi with ruled text lines, as the pipeline renders a scan."""
    image = Image.new("RGB", (1224, 1584), (250, 250, 250))
    draw = ImageDraw.Draw(image)
    for row, top in enumerate(range(120, 1460, 36)):
        draw.rectangle((110, top, 1100 - 13 * ((row + index) % 9), top + 14), fill=(25, 25, 25))
    return image


def run_batch(engine, prefix: str) -> dict:
    """Seconds from the call (encode, enqueue, wait) until every page is reported."""
    requests = [
        OcrRequest(f"{prefix}{n}", letter_page(n), Mode.BASE, 612.0, 792.0) for n in range(PAGES)
    ]
    reported: dict[str, list[OcrResult | Exception]] = {}
    calls = 0

    def finished(request: OcrRequest, outcome: OcrResult | Exception) -> None:
        reported.setdefault(request.key, []).append(outcome)

    class Counting:
        name, model_revision = engine.name, engine.model_revision

        def recognize(self, batch: list[OcrRequest]) -> list[OcrResult]:
            nonlocal calls
            calls += 1
            return engine.recognize(batch)

    started = time.monotonic()
    recognize_isolating_failures(Counting(), requests, finished)
    seconds = time.monotonic() - started
    outcomes = [outcome for key in reported for outcome in reported[key]]
    return {
        "seconds": round(seconds, 3),
        "engine_calls": calls,
        "pages_reported": len(reported),
        "pages_reported_twice": sum(len(v) > 1 for v in reported.values()),
        "all_engine_unavailable": all(isinstance(o, EngineUnavailable) for o in outcomes),
        "reason": str(outcomes[0]) if outcomes else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--admin-url", default=DEFAULT_ADMIN_URL, help="server to create on")
    parser.add_argument("--grace-seconds", type=float, default=None, help="default: setting")
    args = parser.parse_args()

    with temporary_database(args.admin_url) as url:
        overrides = {"engine": EngineChoice.QUEUE, "database_url": url}
        if args.grace_seconds is not None:
            overrides["queue_worker_grace_seconds"] = args.grace_seconds
        settings = Settings(**overrides)
        engine = build_engine(settings)
        grace = settings.queue_worker_grace_seconds
        first = run_batch(engine, "a")
        second = run_batch(engine, "b")
        with session_scope(url) as session:
            left_in_queue = session.query(OcrJob).count()

    before = (2 * PAGES - 1) * grace
    result = {
        "command": "python bench/queue_no_worker.py",
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, Python {platform.python_version()}",
        "store": "postgres (temporary database)",
        "pages_per_batch": PAGES,
        "grace_seconds": grace,
        "first_batch": first,
        "second_batch": second,
        "first_batch_over_grace_seconds": round(first["seconds"] - grace, 3),
        "jobs_left_in_queue": left_in_queue,
        "baseline_computed": {
            "what": "before: each of the 2n-1 calls of the halving tree waited the grace",
            "first_batch_seconds": before,
            "second_batch_seconds": before,
        },
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")

    print(f"no GPU worker, {PAGES}-page batches, grace {grace:.0f} s (Postgres)")
    print(f"{'batch':34} {'seconds':>9} {'calls':>6} {'pages retryable':>16}")
    for label, run in (("first (waits the grace)", first), ("second (remembered)", second)):
        pages = run["pages_reported"] if run["all_engine_unavailable"] else "NO"
        print(f"{label:34} {run['seconds']:>9} {run['engine_calls']:>6} {pages:>16}")
    print(f"{'before, computed (each)':34} {before:>9.0f} {2 * PAGES - 1:>6} {PAGES:>16}")
    print(f"jobs left in the queue: {left_in_queue}; wrote {RESULT.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    main()
