"""Cost and decisions of the scan orientation check (`models.orientation`) against its previous
implementation, on the same pages in the same run.

    python -m bench.orientation [--seeds 2] [--skews 0,2] [--workers 2]
                                [--out bench/results/orientation.json]

Pages are scans built like the end-to-end corpus's (`bench.e2e_corpus`: grey, paper and sensor
noise, JPEG) of every kind it holds, Latin and CJK, rendered the way the pipeline renders them
(`OCRFLOW_RENDER_DPI`), turned 0, 90, 180 and 270 degrees clockwise (a sheet fed sideways or
upside down) and skewed by each of `--skews` degrees (a sheet fed askew). Each image goes through
every check:

* `baseline`: the check as it was before the cut lines: always a detection pass, then the line
  classifier, on the same pixels as `current` (scaled to `DETECT_MIN_SIDE` on the short side,
  cut to the ink and straightened);
* `current`: `detect_pixel_orientation(shared_detector(), image)` as the CPU workers run it:
  the lines projection profiles cut out when they are clear-cut, else that detection pass.

Both run one ONNX thread per process, as the CPU workers do.

Reported: seconds per page in one process (every check on each page, which goes first by
turns), pages per second with `--workers` processes checking pages at once (the CPU workers run
one per core, so the ONNX threads of each compete), the share of pages each check turns the right
way, and how often the checks agree.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import pymupdf
from PIL import Image

from bench.e2e_corpus import PAGE_BUILDERS, scan
from bench.routing_corpus import TYPEFACES
from infra.settings import Settings
from models import orientation
from models.orientation import (
    CUT_LINES,
    PixelOrientation,
    detect_pixel_orientation,
    detector_pixels,
    orientation_from_detector,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
KINDS = ("slide", "letter", "report", "book", "ledger", "two-column", "table", "newspaper")
TURNS = (0, 90, 180, 270)


def baseline_detect(image: Image.Image) -> PixelOrientation:
    """The check before the cut lines: a detection pass on every page (on the same scaled,
    ink-cut and straightened pixels)."""
    return orientation_from_detector(orientation.shared_detector(), detector_pixels(image))


def current_detect(image: Image.Image) -> PixelOrientation:
    return detect_pixel_orientation(orientation.shared_detector(), image)


CHECKS = {"baseline": baseline_detect, "current": current_detect}


def build_pages(seeds: int, dpi: int) -> list[tuple[str, bytes]]:
    """(name, PNG of the upright render) for every kind, Latin for each seed, CJK for one."""
    pages = []
    for seed in range(seeds):
        for kind in KINDS:
            for script in ("latin", "cjk"):
                if script == "cjk" and (seed > 0 or kind == "ledger"):
                    continue
                rng = random.Random(f"orientation-{seed}-{kind}-{script}")
                source = pymupdf.open()
                PAGE_BUILDERS[kind](source, TYPEFACES[script], rng)
                pixmap = scan(source[0], rng)[0].get_pixmap(
                    dpi=dpi, colorspace=pymupdf.csRGB, alpha=False
                )
                image = Image.frombytes("RGB", (pixmap.width, pixmap.height), pixmap.samples)
                png = io.BytesIO()
                image.save(png, "PNG")
                pages.append((f"{kind}-{script}-{seed}", png.getvalue()))
    return pages


def turned(png: bytes, clockwise: int, skew: float = 0.0) -> Image.Image:
    """The page turned `clockwise` degrees, then `skew` degrees counter-clockwise on white."""
    image = Image.open(io.BytesIO(png)).convert("RGB").rotate(-clockwise, expand=True)
    return image.rotate(skew, expand=True, fillcolor="white") if skew else image


def _timed(check: str, image: Image.Image) -> tuple[PixelOrientation, float]:
    started = time.perf_counter()
    found = CHECKS[check](image)
    return found, time.perf_counter() - started


def _check_in_worker(task: tuple[str, bytes, int, float]) -> float:
    check, png, clockwise, skew = task
    return _timed(check, turned(png, clockwise, skew))[1]


def _warm_worker(check: str) -> None:
    CHECKS[check](Image.new("RGB", (64, 64), "white"))


def parallel_pages_per_second(
    check: str, pages: list[tuple[str, bytes]], skews: list[float], workers: int
) -> float:
    """Pages per second with `workers` processes checking at once (models loaded beforehand)."""
    tasks = [
        (check, png, clockwise, skew)
        for _name, png in pages
        for clockwise in TURNS
        for skew in skews
    ]
    with ProcessPoolExecutor(
        workers, mp_context=get_context("spawn"), initializer=_warm_worker, initargs=(check,)
    ) as pool:
        list(pool.map(_check_in_worker, [(check, pages[0][1], 0, 0.0)] * workers))  # all started
        started = time.perf_counter()
        list(pool.map(_check_in_worker, tasks, chunksize=1))
        return len(tasks) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2, help="Latin pages per kind")
    parser.add_argument(
        "--skews", default="0,2", help="degrees each turned page is also fed askew, comma-separated"
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench/results/orientation.json")
    args = parser.parse_args()
    skews = [float(skew) for skew in args.skews.split(",")]

    settings = Settings(database_url="sqlite://")
    pages = build_pages(args.seeds, settings.render_dpi)
    for check in CHECKS:
        _warm_worker(check)
    rows = []
    for name, png in pages:
        for clockwise in TURNS:
            for skew in skews:
                image = turned(png, clockwise, skew)
                shift = len(rows) % len(CHECKS)  # who goes first rotates
                order = list(CHECKS)[shift:] + list(CHECKS)[:shift]
                row: dict[str, Any] = {"page": name, "clockwise": clockwise, "skew": skew,
                                       "px": list(image.size)}  # fmt: skip
                for check in order:
                    found, seconds = _timed(check, image)
                    row[check] = {"angle": found.angle, "confidence": found.confidence,
                                  "lines": found.lines, "method": found.method,
                                  "s": round(seconds, 3)}  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)

    summary: dict[str, Any] = {}
    for check in CHECKS:
        seconds = [row[check]["s"] for row in rows]
        summary[check] = {
            "s_per_page_mean": round(statistics.mean(seconds), 3),
            "s_per_page_median": round(statistics.median(seconds), 3),
            "s_per_page_max": round(max(seconds), 3),
            "s_per_page_by_kind": {
                kind: round(
                    statistics.mean(
                        row[check]["s"] for row in rows if row["page"].startswith(f"{kind}-")
                    ),
                    3,
                )
                for kind in KINDS
            },
            "right_way_up": sum(row[check]["angle"] == row["clockwise"] for row in rows),
            "right_way_up_by_skew": {
                str(skew): sum(
                    row[check]["angle"] == row["clockwise"] for row in rows if row["skew"] == skew
                )
                for skew in skews
            },
            "decided_by_cut_lines": sum(row[check]["method"] == CUT_LINES for row in rows),
            f"pages_per_s_{args.workers}_workers": round(
                parallel_pages_per_second(check, pages, skews, args.workers), 2
            ),
        }
    agree = sum(row["baseline"]["angle"] == row["current"]["angle"] for row in rows)
    summary["pages"] = len(rows)
    summary["decisions_agree"] = agree
    summary["disagreements"] = [
        {"page": row["page"], "clockwise": row["clockwise"], "skew": row["skew"],
         "baseline": row["baseline"]["angle"], "current": row["current"]["angle"]}
        for row in rows if row["baseline"]["angle"] != row["current"]["angle"]
    ]  # fmt: skip

    print(
        f"\n{'check':17} {'s/page':>7} {'median':>7} {'max':>6} {'pages/s':>8} {'right':>9} "
        f"{'cut lines':>10}"
    )
    for check in CHECKS:
        s = summary[check]
        print(
            f"{check:17} {s['s_per_page_mean']:7.3f} {s['s_per_page_median']:7.3f} "
            f"{s['s_per_page_max']:6.2f} {s[f'pages_per_s_{args.workers}_workers']:8.2f} "
            f"{s['right_way_up']:>4}/{len(rows)} {s['decided_by_cut_lines']:>10}"
        )
    print(f"both checks decide alike on {agree}/{len(rows)} pages")

    result = {
        "command": (
            f"python -m bench.orientation --seeds {args.seeds} --skews {args.skews} "
            f"--workers {args.workers}"
        ),
        "machine": f"{os.cpu_count()} cores",
        "render_dpi": settings.render_dpi,
        "baseline": "a detection pass on every page (the check before the cut lines), same pixels",
        "current": {
            "detect_min_side": orientation.DETECT_MIN_SIDE,
            "cut_to_ink": True,
            "cut_lines_first": True,
            "cut_min_agreement": orientation.CUT_MIN_AGREEMENT,
            "threads": orientation.DETECTOR_THREADS,
        },
        "summary": summary,
        "pages": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
