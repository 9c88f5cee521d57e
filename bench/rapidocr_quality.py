"""RapidOCR accuracy on the bundled samples: library defaults against our tuned engine.

Pages are rendered the way the pipeline renders them (`OCRFLOW_RENDER_DPI`, 144 by default)
and scored against `samples/ground_truth.json` with whitespace-normalised character and word
error rates, in reading order. Run: `python bench/rapidocr_quality.py` (about 2 minutes on two
cores); writes `bench/results/rapidocr.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from infra.settings import Settings  # noqa: E402
from models.engine import OcrRequest  # noqa: E402
from models.rapidocr_engine import RapidOcrEngine  # noqa: E402
from models.text_metrics import character_error_rate, word_error_rate  # noqa: E402
from tasks.split import open_document  # noqa: E402

SAMPLES = REPO_ROOT / "samples"
PAGES = [
    ("scan.pdf", 1),
    ("receipt.png", 1),
    ("fax.tiff", 1),
    ("fax.tiff", 2),
    ("report.pdf", 1),
    ("report.pdf", 2),
    ("two_column.pdf", 1),
    ("slide.pdf", 1),
]


def run_defaults(image) -> str:
    """RapidOCR exactly as installed: classifier on, 0.5 thresholds, its own line order."""
    from rapidocr_onnxruntime import RapidOCR

    global _default_ocr
    if _default_ocr is None:
        _default_ocr = RapidOCR(intra_op_num_threads=2, inter_op_num_threads=1)
    raw, _ = _default_ocr(np.asarray(image)[:, :, ::-1])
    return "\n".join(entry[1] for entry in raw or [])


_default_ocr = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench/results/rapidocr.json")
    args = parser.parse_args()

    settings = Settings(database_url="sqlite://")
    truth = json.loads((SAMPLES / "ground_truth.json").read_text())
    engine = RapidOcrEngine()
    rows = []
    for name, page_no in PAGES:
        with open_document(SAMPLES / name, settings) as document:
            page = next(document.iter_pages(start=page_no, end=page_no))
            image = page.render(settings.render_dpi)
            width, height = page.width, page.height
        expected = truth[name][page_no - 1]
        started = time.perf_counter()
        baseline = run_defaults(image)
        baseline_s = time.perf_counter() - started
        started = time.perf_counter()
        request = OcrRequest(key=name, image=image, mode=None, page_width=width, page_height=height)
        tuned = engine.recognize([request])[0].markdown
        tuned_s = time.perf_counter() - started
        rows.append(
            {
                "page": f"{name}#{page_no}",
                "render_px": list(image.size),
                "default_cer": round(character_error_rate(baseline, expected), 4),
                "default_wer": round(word_error_rate(baseline, expected), 4),
                "default_s": round(baseline_s, 2),
                "tuned_cer": round(character_error_rate(tuned, expected), 4),
                "tuned_wer": round(word_error_rate(tuned, expected), 4),
                "tuned_s": round(tuned_s, 2),
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    header = f"{'page':18} {'def CER':>8} {'def WER':>8} {'CER':>7} {'WER':>7} {'s/page':>7}"
    print(header)
    for row in rows:
        print(
            f"{row['page']:18} {row['default_cer']:8.3f} {row['default_wer']:8.3f} "
            f"{row['tuned_cer']:7.3f} {row['tuned_wer']:7.3f} {row['tuned_s']:7.1f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "engine": f"rapidocr-onnxruntime {engine.model_revision}",
        "tuning": engine.tuning.__dict__,
        "render_dpi": settings.render_dpi,
        "pages": rows,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
