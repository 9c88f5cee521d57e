"""Split + route + persist throughput on one core, and peak memory over a long PDF.

1. Pages/s over a generated 500-page born-digital PDF, pinned to one CPU core: open and
   iterate in windows (split), page features and routing (route), the text layer for
   `text-layer` pages, and page + result rows written with one transaction per window
   (persist). Each stage is timed separately.
2. Peak RSS of a child process that splits and routes a generated 2,000-page PDF, in windows
   of `page_window` pages, against a baseline child that takes the whole PDF as one window.

Run: `python bench/split_throughput.py [--database-url URL]` (default: a temporary SQLite
file; pass a Postgres URL to measure the production store). Writes
`bench/results/split.json` and prints a table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from infra.db.migrate import upgrade  # noqa: E402
from infra.db.models import Document, DocumentStatus, Page, PageResult, PageStatus  # noqa: E402
from infra.db.session import session_scope  # noqa: E402
from infra.settings import PIPELINE_VERSION, Settings  # noqa: E402
from infra.vocabulary import Route  # noqa: E402
from samples.make_samples import write_long_pdf  # noqa: E402
from tasks.pages import route_source_page  # noqa: E402
from tasks.split import SourcePage, open_document  # noqa: E402

THROUGHPUT_PAGES = 500
MEMORY_PAGES = 2000


def measure_throughput(pdf: Path, settings: Settings) -> dict:
    """Runs split -> route -> text layer -> persist over every page; seconds per stage."""
    seconds: Counter[str] = Counter()
    routes: Counter[str] = Counter()
    with session_scope(settings.database_url) as session:
        document = Document(
            source_uri=str(pdf),
            sha256=hashlib.sha256(f"bench-{uuid.uuid4()}".encode()).hexdigest(),
            size_bytes=pdf.stat().st_size,
            media_type="application/pdf",
            status=DocumentStatus.RUNNING,
            pipeline_version=PIPELINE_VERSION,
        )
        session.add(document)
        session.flush()
        document_id = document.id

    started = time.perf_counter()
    with open_document(pdf, settings) as split:
        window: list[tuple[SourcePage, object, object, object]] = []
        mark = time.perf_counter()
        for page in split.iter_pages():
            seconds["split"] += time.perf_counter() - mark
            mark = time.perf_counter()
            features, decision = route_source_page(page, settings)
            seconds["route"] += time.perf_counter() - mark
            mark = time.perf_counter()
            result = page.text_layer_result() if decision.route == Route.TEXT_LAYER else None
            seconds["text_layer"] += time.perf_counter() - mark
            routes[str(decision.route)] += 1
            window.append((page, features, decision, result))
            if len(window) == settings.page_window or page.page_no == split.page_count:
                mark = time.perf_counter()
                persist_window(document_id, window, settings)
                seconds["persist"] += time.perf_counter() - mark
                window = []
            mark = time.perf_counter()
    total = time.perf_counter() - started
    return {
        "pages": split.page_count,
        "seconds": round(total, 2),
        "pages_per_s": round(split.page_count / total, 1),
        "stage_ms_per_page": {k: round(v / split.page_count * 1000, 2) for k, v in seconds.items()},
        "routes": dict(routes),
    }


def persist_window(document_id: int, window: list, settings: Settings) -> None:
    """One transaction per window: page rows and, for text-layer pages, their result."""
    with session_scope(settings.database_url) as session:
        for page, features, decision, result in window:
            row = Page(
                document_id=document_id,
                page_no=page.page_no,
                width=page.width,
                height=page.height,
                route=str(decision.route),
                mode=decision.mode.value if decision.mode else None,
                route_reason=decision.reason,
                features=features.to_dict(),
                est_text_tokens=decision.est_text_tokens,
                vision_tokens=decision.vision_tokens,
                status=PageStatus.DONE if result else PageStatus.PENDING,
                attempts=1 if result else 0,
            )
            if result is not None:
                row.results = [
                    PageResult(
                        attempt=1,
                        route=str(decision.route),
                        engine=result.engine,
                        model_revision=result.model_revision,
                        markdown=result.markdown,
                        blocks=[block.__dict__ for block in result.blocks],
                        raw_output=result.raw_output,
                        finish_reason=result.finish_reason.value,
                        accepted=True,
                    )
                ]
            session.add(row)


MEMORY_CHILD = """
import json, resource, sys
sys.path.insert(0, {root!r})
from pathlib import Path
from infra.settings import Settings
from tasks.split import open_document
from tasks.pages import route_source_page

def rss_mib():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20

settings = Settings(database_url="sqlite://", page_window={window})
trace = [round(rss_mib(), 1)]  # after imports, before the first page
with open_document(Path({pdf!r}), settings) as document:
    for page in document.iter_pages():
        route_source_page(page, settings)
        page.text_layer_result()
        if page.page_no % 250 == 0:
            trace.append(round(rss_mib(), 1))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({{"peak_rss_mib": round(peak, 1), "rss_trace_mib": trace}}))
"""


def measure_memory(pdf: Path, window: int) -> dict:
    code = MEMORY_CHILD.format(root=str(REPO_ROOT), pdf=str(pdf), window=window)
    started = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    trace = result["rss_trace_mib"]
    result["rss_after_imports_mib"] = trace[0]
    result["growth_after_first_250_pages_mib"] = round(max(trace[1:]) - trace[1], 1)
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["page_window"] = window
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", help="where page rows go (default: temporary SQLite)")
    parser.add_argument("--pages", type=int, default=THROUGHPUT_PAGES)
    parser.add_argument("--memory-pages", type=int, default=MEMORY_PAGES)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench/results/split.json")
    args = parser.parse_args()

    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core, children too
    with tempfile.TemporaryDirectory(prefix="ocrflow-bench-") as tmp:
        database_url = args.database_url or f"sqlite:///{Path(tmp) / 'bench.db'}"
        upgrade(database_url)
        settings = Settings(database_url=database_url)
        short_pdf = write_long_pdf(Path(tmp) / "born_digital_500.pdf", args.pages)
        long_pdf = write_long_pdf(Path(tmp) / "born_digital_2000.pdf", args.memory_pages)

        throughput = measure_throughput(short_pdf, settings)
        windowed = measure_memory(long_pdf, settings.page_window)
        one_window = measure_memory(long_pdf, args.memory_pages)

    store = "postgres" if database_url.startswith("postgresql") else "sqlite"
    result = {
        "command": "python bench/split_throughput.py"
        + (" --database-url <postgres>" if store == "postgres" else ""),
        "machine": f"{platform.machine()}, 1 core pinned, Python {platform.python_version()}",
        "store": store,
        "throughput": throughput,
        "memory": {"windowed": windowed, "baseline_one_window": one_window},
    }
    print(f"{'measure':44} {'value':>12}")
    label = f"split+route+persist, {throughput['pages']} pages, 1 core"
    print(f"{label:44} {throughput['pages_per_s']:>8} p/s")
    for stage, ms in throughput["stage_ms_per_page"].items():
        print(f"{'  ' + stage + ' (ms/page)':44} {ms:>12}")
    runs = [(f"window {windowed['page_window']}", windowed), ("one window", one_window)]
    for name, run in runs:
        label = f"peak RSS, {args.memory_pages:,} pages, {name}"
        print(f"{label:44} {run['peak_rss_mib']:>8} MiB")
        growth = run["growth_after_first_250_pages_mib"]
        print(f"{'  growth after the first 250 pages':44} {growth:>8} MiB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
