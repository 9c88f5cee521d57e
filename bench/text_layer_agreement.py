"""Word-level agreement of stored text with the text layer on born-digital pages, before and
after engine-aware routing and the cross-check (issue 12), on the default CPU engine.

A born-digital page's text layer is what its author wrote, so whatever ocrflow stores for the
page should hold the same words. Each page goes through the real page pipeline (`plan_pages`
then `recognize_pages` with RapidOCR, routing policy `auto`); the stored text (the accepted
attempt, else the last one) is compared with the layer, words NFKC- and case-folded:

* recall: share of the layer's words found in the stored text (multiset);
* precision: share of the stored words found in the layer; F1 of the two.

The baseline is the same pipeline at `--baseline-ref` (default: the commit before the change),
exported with `git archive` into a temporary directory and run in a subprocess, so both
figures come from one run on one corpus.

    python -m bench.text_layer_agreement [--baseline-ref REF] [--out PATH.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import unicodedata
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BASELINE = "93476c3"  # main before issue 12's routing and cross-check
DEFAULT_OUT = REPO / "bench" / "results" / "text_layer_agreement.json"
ISSUE_KINDS = ("arabic", "german-math", "german-prose", "formula", "table",
               "arabic-picture", "german-prose-picture")  # fmt: skip
CORPUS_KINDS = (("slide", "latin"), ("letter", "latin"), ("report", "latin"),
                ("two-column", "latin"), ("table", "latin"), ("newspaper", "latin"),
                ("report", "cjk"), ("table", "cjk"))  # fmt: skip


def write_corpus(directory: Path) -> list[Path]:
    """One PDF per page kind: issue 12's pages and the routing corpus's born-digital kinds."""
    from bench.routing_corpus import born_digital
    from tests.born_digital import write_pdf

    paths = [write_pdf(directory / f"{kind}.pdf", [kind]) for kind in ISSUE_KINDS]
    for kind, script in CORPUS_KINDS:
        path = directory / f"corpus-{kind}-{script}.pdf"
        born_digital(kind, script, 1, seed=3).save(path)
        paths.append(path)
    return paths


def read_stored(paths: list[Path]) -> list[dict]:
    """Runs the page pipeline of whatever ocrflow is importable; the stored text per page."""
    from infra.settings import Settings
    from models.rapidocr_engine import RapidOcrEngine
    from tasks.pages import plan_pages, recognize_pages

    settings = Settings(database_url="sqlite://", engine="rapidocr")
    engine = RapidOcrEngine()
    pages = []
    for path in paths:
        plans = plan_pages(path, settings, [1])
        [record] = recognize_pages(path, settings, plans, engine)
        accepted = [a for a in record.attempts if a.result_fields["accepted"]]
        final = (accepted or record.attempts)[-1].result_fields if record.attempts else {}
        pages.append({
            "page": path.stem,
            "route": str(record.fields["route"]),
            "status": record.fields["status"],
            "engine": final.get("engine"),
            "text": final.get("markdown", ""),
        })  # fmt: skip
    return pages


def agreement(stored: str, layer: str) -> dict[str, float | list[str] | None]:
    """Word recall, precision and F1 of `stored` against `layer`; recall of the layer's
    non-ASCII letters and symbols (`ß`, `€`, `∈`, Arabic; None when the layer has none), and
    the scripts lost."""
    from tasks.crosscheck import _normalise, _words, cross_check

    truth, got = _words(_normalise(layer)), _words(_normalise(stored))
    common = sum((truth & got).values())
    recall = common / max(sum(truth.values()), 1)
    precision = common / max(sum(got.values()), 1)
    f1 = 2 * recall * precision / (recall + precision) if recall + precision else 0.0
    # NFKC without case folding, which would turn `ß` into `ss`.
    rare_truth = Counter(c for c in unicodedata.normalize("NFKC", layer) if ord(c) > 127)
    rare_got = Counter(c for c in unicodedata.normalize("NFKC", stored) if ord(c) > 127)
    rare_total = sum(rare_truth.values())
    rare = sum((rare_truth & rare_got).values()) / rare_total if rare_total else None
    return {
        "recall": round(recall, 4),
        "precision": round(precision, 4),
        "f1": round(f1, 4),
        "non_ascii_recall": round(rare, 4) if rare is not None else None,
        "lost_scripts": list(cross_check(stored, layer).lost_scripts),
    }


def _layer_text(path: Path) -> str:
    import pymupdf

    with pymupdf.open(path) as document:
        return document[0].get_text()


def _run_baseline(ref: str, corpus: Path) -> list[dict]:
    """The baseline commit's pipeline on the same PDFs, in a subprocess."""
    with tempfile.TemporaryDirectory(prefix="ocrflow-baseline-") as tree:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", ref], check=True,
                                 capture_output=True).stdout  # fmt: skip
        subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
        env = {**os.environ, "PYTHONPATH": tree}
        out = Path(tree) / "stored.json"
        subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--read", str(corpus),
             "--read-out", str(out)],
            check=True, cwd=tree, env=env,
        )  # fmt: skip
        return json.loads(out.read_text())


def _summarise(pages: list[dict], layers: dict[str, str]) -> dict:
    for page in pages:
        page.update(agreement(page["text"], layers[page["page"]]))
    rare = [p["non_ascii_recall"] for p in pages if p["non_ascii_recall"] is not None]
    return {
        "mean_recall": round(statistics.fmean(p["recall"] for p in pages), 4),
        "mean_f1": round(statistics.fmean(p["f1"] for p in pages), 4),
        "min_recall": min(p["recall"] for p in pages),
        "mean_non_ascii_recall": round(statistics.fmean(rare), 4) if rare else None,
        "pages_with_non_ascii": len(rare),
        "pages_with_lost_scripts": sum(bool(p["lost_scripts"]) for p in pages),
        "routes": dict(Counter(str(p["route"]) for p in pages)),
        "pages": pages,
    }


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-ref", default=DEFAULT_BASELINE)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--read", type=Path, help=argparse.SUPPRESS)  # baseline subprocess
    parser.add_argument("--read-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.read is not None:
        paths = sorted(args.read.glob("*.pdf"))
        args.read_out.write_text(json.dumps(read_stored(paths), ensure_ascii=False))
        return

    with tempfile.TemporaryDirectory(prefix="ocrflow-agreement-") as directory:
        corpus = Path(directory)
        paths = sorted(write_corpus(corpus))
        layers = {path.stem: _layer_text(path) for path in paths}
        before = _summarise(_run_baseline(args.baseline_ref, corpus), layers)
        after = _summarise(read_stored(paths), layers)

    print(f"{'page':<22} {'before':<10} {'recall':>7} {'F1':>6} {'rare':>6}   "
          f"{'after':<10} {'recall':>7} {'F1':>6} {'rare':>6}")  # fmt: skip
    for old, new in zip(before["pages"], after["pages"], strict=True):
        row = f"{old['page']:<22}"
        for page in (old, new):
            lost = " -" + ",".join(page["lost_scripts"]) if page["lost_scripts"] else ""
            row += (f" {page['route'] or '-':<10} {page['recall']:>7.1%} {page['f1']:>6.1%} "
                    f"{_percent(page['non_ascii_recall']):>6}{lost}  ")  # fmt: skip
        print(row)
    for label, result in (("before", before), ("after", after)):
        print(f"{label}: mean word recall {result['mean_recall']:.1%}, mean F1 "
              f"{result['mean_f1']:.1%}, lowest recall {result['min_recall']:.1%}, mean "
              f"non-ASCII character recall {_percent(result['mean_non_ascii_recall'])} "
              f"({result['pages_with_non_ascii']} pages with any), pages that "
              f"lost a script {result['pages_with_lost_scripts']}, "
              f"routes {result['routes']}")  # fmt: skip
    for result in (before, after):
        for page in result["pages"]:
            del page["text"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "baseline_ref": args.baseline_ref,
        "engine": "rapidocr (default CPU install)",
        "metric": "word recall/precision/F1 of stored text vs the page's text layer, NFKC+casefold",
        "before": before,
        "after": after,
    }, indent=2, ensure_ascii=False) + "\n")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
