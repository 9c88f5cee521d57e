"""Routing benchmark over the mixed corpus (`bench.routing_corpus`).

Prints and records: vision tokens of the routed pages against all-Gundam and all-Base, the
pixel estimator's error against the text-layer token count (each born-digital page vs its scan),
the modes chosen per kind, and routing throughput (features + route, pages/s on one core).

    OMP_NUM_THREADS=1 python -m bench.routing [--pages-per-file N] [--out PATH.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

from bench.routing_corpus import KINDS, SCRIPTS, born_digital, scan_of
from infra.settings import RoutingPolicy
from infra.vocabulary import Mode
from models.capabilities import DEEPSEEK_OCR
from models.deepseek_ocr.tokenizer import load_tokenizer
from tasks.estimate import estimate_text_tokens
from tasks.features import extract_page_features
from tasks.routing import route_page, vision_tokens_for

RENDER_DPI = 144


def _route_all(doc, policy: RoutingPolicy) -> tuple[list, float]:
    """(features, decision) per page and the seconds features + routing took."""
    routed = []
    start = time.perf_counter()
    for page in doc:
        features = extract_page_features(page)
        decision = route_page(
            features,
            page.rect.width,
            page.rect.height,
            policy=policy,
            render_dpi=RENDER_DPI,
            engine=DEEPSEEK_OCR,  # the vision-token figures are DeepSeek-OCR's
        )
        routed.append((features, decision))
    return routed, time.perf_counter() - start


def run(pages_per_file: int) -> dict:
    load_tokenizer()  # built once per process; not part of per-page cost
    totals: Counter[str] = Counter()
    modes: dict[str, Counter] = defaultdict(Counter)
    timing = {"born-digital": [0, 0.0], "scan": [0, 0.0]}
    errors: dict[str, list[float]] = defaultdict(list)

    def account(doc, kind: str, label: str) -> list:
        auto, seconds = _route_all(doc, RoutingPolicy.AUTO)
        timing[label][0] += len(auto)
        timing[label][1] += seconds
        forced, _ = _route_all(doc, RoutingPolicy.ALWAYS_OCR)
        for (_, auto_decision), (_, ocr_decision) in zip(auto, forced, strict=True):
            size = auto_decision.image_size
            totals["pages"] += 1
            totals["auto"] += auto_decision.vision_tokens
            totals["always_ocr"] += ocr_decision.vision_tokens
            totals["all_gundam"] += vision_tokens_for(Mode.GUNDAM, size)
            totals["all_base"] += vision_tokens_for(Mode.BASE, size)
            modes[f"{kind}/{label}"][str(auto_decision.mode or auto_decision.route)] += 1
        return auto

    for kind in KINDS:
        for script in SCRIPTS:
            source = born_digital(kind, script, pages_per_file)
            born = account(source, kind, "born-digital")
            scanned = account(scan_of(source), kind, "scan")
            for (truth, _), (measured, _) in zip(born, scanned, strict=True):
                estimate = estimate_text_tokens(measured).tokens
                errors[f"{kind}/{script}"].append(estimate / truth.text_tokens - 1)
    return {
        "vision_tokens": dict(totals),
        "modes": {key: dict(counter) for key, counter in modes.items()},
        "throughput_pages_per_s": {
            label: round(pages / seconds, 1) for label, (pages, seconds) in timing.items()
        },
        "estimator_error": {
            key: {
                "median_abs": round(statistics.median(abs(e) for e in values), 3),
                "within_35pct": round(sum(abs(e) <= 0.35 for e in values) / len(values), 2),
            }
            for key, values in errors.items()
        },
        "estimator_within_35pct_text_pages": round(
            statistics.mean(
                abs(e) <= 0.35
                for key, values in errors.items()
                if not key.startswith("table/")
                for e in values
            ),
            3,
        ),
    }


def _print(result: dict) -> None:
    tokens = result["vision_tokens"]

    def saved(routed: int, baseline: int) -> str:
        return f"{baseline - routed} ({1 - routed / baseline:.0%})"

    print(f"pages: {tokens['pages']}")
    print(
        f"{'policy':12} {'vision tokens':>14} {'saved vs all-Gundam':>22} {'saved vs all-Base':>20}"
    )
    for policy in ("auto", "always_ocr"):
        routed = tokens[policy]
        print(
            f"{policy:12} {routed:>14} {saved(routed, tokens['all_gundam']):>22} "
            f"{saved(routed, tokens['all_base']):>20}"
        )
    print(f"baselines: all-Gundam {tokens['all_gundam']}, all-Base {tokens['all_base']}\n")
    print(f"{'kind/script':22} {'median |error|':>15} {'within 35%':>11}")
    for key, stats in result["estimator_error"].items():
        print(f"{key:22} {stats['median_abs']:>15.1%} {stats['within_35pct']:>11.0%}")
    print(f"text pages within 35%: {result['estimator_within_35pct_text_pages']:.0%}\n")
    print("routes (auto):")
    for key, counter in result["modes"].items():
        print(f"  {key:24} {dict(counter)}")
    print("\nthroughput (features + route, one core):", result["throughput_pages_per_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages-per-file", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("bench/results/routing.json"))
    args = parser.parse_args()
    result = run(args.pages_per_file)
    result["command"] = "OMP_NUM_THREADS=1 python -m bench.routing " + " ".join(sys.argv[1:])
    result["machine"] = f"{platform.machine()} {platform.python_version()}"
    _print(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
