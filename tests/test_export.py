"""Exports of stored results: searchable PDFs whose invisible text matches what was stored and
sits where it is printed, ALTO v4 with the schema's required structure, and the text formats.

The documents are made here: a born-digital PDF and the same pages rasterised to images only,
run through the real pipeline with the CPU engine (RapidOCR)."""

from __future__ import annotations

import json
import unicodedata
import xml.etree.ElementTree as ET
from pathlib import Path

import pymupdf
import pytest
from typer.testing import CliRunner

from flows.ingest import ingest
from infra.db.session import session_scope
from tasks.exports.alto import ALTO_NAMESPACE
from tasks.exports.document import ExportPage, load_export_document
from tasks.exports.layout import plain_text
from tasks.exports.pdf import TextLayerFonts, add_text_layer
from tasks.exports.writer import ExportFormat, export_documents

LINES = [
    "Minutes of the harbour board meeting",
    "The ledger of tolls was read and approved",
    "Repairs to the north quay are urgent",
]
ARABIC = "تقع المكتبة الوطنية في وسط المدينة"
CJK_PARAGRAPH = "本馆收藏地方志、家谱和契约文书共三万余件，均已扫描并可全文检索。"
A = f"{{{ALTO_NAMESPACE}}}"


def make_born_digital(path: Path, pages: int = 2) -> Path:
    document = pymupdf.open()
    for number in range(1, pages + 1):
        page = document.new_page()
        for row, line in enumerate(LINES):
            page.insert_text((72, 100 + 40 * row), f"{line} {number}", fontsize=18)
    document.save(path)
    return path


def rasterise(source: Path, path: Path, dpi: int = 200) -> Path:
    """The same pages as images only: no text layer left."""
    scanned = pymupdf.open()
    for page in pymupdf.open(source):
        image = scanned.new_page(width=page.rect.width, height=page.rect.height)
        image.insert_image(image.rect, pixmap=page.get_pixmap(dpi=dpi))
    scanned.save(path)
    return path


def words(text: str) -> list[str]:
    return unicodedata.normalize("NFKC", text).split()


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory, prefect_server):
    """A born-digital PDF and its rasterised twin, ingested once for the module with RapidOCR
    into SQLite: (url, digital id, scan id, the born-digital file)."""
    from infra.db.migrate import upgrade

    folder = tmp_path_factory.mktemp("export")
    url = f"sqlite:///{folder / 'ocrflow.db'}"
    upgrade(url)
    digital = make_born_digital(folder / "digital.pdf")
    scan = rasterise(digital, folder / "scan.pdf")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OCRFLOW_DATABASE_URL", url)
        env.setenv("OCRFLOW_ENGINE", "rapidocr")
        outcomes = {Path(o["source"]).name: o for o in ingest([str(digital), str(scan)])}
    assert {o["status"] for o in outcomes.values()} == {"done"}
    return url, outcomes["digital.pdf"]["id"], outcomes["scan.pdf"]["id"], digital


def stored(url: str, document_id: int):
    with session_scope(url) as session:
        return load_export_document(session=session, document_id=document_id)


def test_pdf_export_adds_the_stored_text_where_it_is_printed(ingested, tmp_path: Path) -> None:
    url, digital_id, scan_id, digital = ingested
    written, failures = export_documents(
        database_url=url, document_ids=[scan_id, digital_id], formats=[ExportFormat.PDF],
        out=str(tmp_path / "out"),
    )  # fmt: skip
    assert failures == []
    paths = {file.document_id: Path(file.path) for file in written}

    scan = stored(url, scan_id)
    assert [page.route for page in scan.pages] == ["ocr", "ocr"]
    exported = pymupdf.open(paths[scan_id])
    original = pymupdf.open(digital)
    assert exported.page_count == len(scan.pages) == 2
    for pdf_page, page, printed in zip(exported, scan.pages, original, strict=True):
        assert words(pdf_page.get_text()) == words(plain_text(page.markdown))
        assert pdf_page.get_images()  # the scanned image is still there
        # Each word's invisible box lies on the word as printed in the born-digital original.
        printed_words = [(w[4], pymupdf.Rect(w[:4])) for w in printed.get_text("words")]
        unique = {
            word: rect
            for word, rect in printed_words
            if [w for w, _ in printed_words].count(word) == 1
        }
        checked = 0
        for x0, y0, x1, y1, word, *_ in pdf_page.get_text("words"):
            if word in unique:
                checked += 1
                target = unique[word]
                assert abs((y0 + y1) / 2 - (target.y0 + target.y1) / 2) < 6, word
                # Engines store lines, not words: a word may drift along its line by the
                # difference between the layer's font and the printed one, but still covers
                # most of the printed word.
                overlap = min(x1, target.x1) - max(x0, target.x0)
                assert overlap > 0.5 * min(x1 - x0, target.width), word
        assert checked >= 10

    # A page that kept its own text layer gets nothing added.
    digital_export = pymupdf.open(paths[digital_id])
    for pdf_page, printed in zip(digital_export, original, strict=True):
        assert pdf_page.get_text() == printed.get_text()
        assert not [f for f in pdf_page.get_fonts() if "Noto" in f[3]]


def test_text_layer_covers_cjk_and_arabic_from_grounding_boxes() -> None:
    """DeepSeek-OCR blocks (0..999 boxes, a paragraph per block) in Chinese, Arabic and Latin."""
    paragraph = "The **ledger** of tolls was read, approved and signed by the clerk of the board."
    blocks = [
        {"label": "title", "text": "# 地方档案馆年报", "boxes_bins": [[100, 50, 600, 90]]},
        {"label": "text", "text": ARABIC, "boxes_bins": [[100, 120, 900, 160]]},
        {"label": "text", "text": paragraph, "boxes_bins": [[100, 200, 400, 300]]},
        {"label": "text", "text": CJK_PARAGRAPH, "boxes_bins": [[100, 320, 300, 380]]},
        {"label": "image", "text": "", "boxes_bins": [[100, 400, 900, 900]]},
    ]  # fmt: skip
    page = ExportPage(
        page_no=1, width=612, height=792, status="done", route="ocr", mode="base",
        engine="deepseek-ocr", markdown="\n\n".join(b["text"] for b in blocks), blocks=blocks,
    )  # fmt: skip
    document = pymupdf.open()
    pdf_page = document.new_page(width=612, height=792)
    add_text_layer(pdf_page, page, TextLayerFonts())
    document.subset_fonts()
    reopened = pymupdf.open("pdf", document.tobytes(garbage=3, deflate=True))[0]

    extracted = words(reopened.get_text())
    stored_words = words(plain_text(page.markdown))
    latin_and_arabic = [w for w in stored_words if not any("\u4e00" <= c <= "\u9fff" for c in w)]
    assert set(latin_and_arabic) <= set(extracted)
    # A CJK paragraph is cut into printed lines between characters, so compare characters.
    assert sorted("".join(extracted)) == sorted("".join(stored_words))
    assert CJK_PARAGRAPH in "".join(reopened.get_text().split())
    family = reopened.search_for("家谱")[0]
    assert family.x0 >= 100 / 999 * 612 - 2 and family.y1 <= 380 / 999 * 792 + 2
    assert all(font[1] != "n/a" for font in reopened.get_fonts())  # every font embedded
    title = reopened.search_for("档案馆")[0]
    assert title.y1 < 90 / 999 * 792 + 2 and title.x0 >= 100 / 999 * 612 - 2
    ledger = reopened.search_for("ledger")[0]  # wrapped into the paragraph's box
    assert ledger.y0 >= 200 / 999 * 792 - 2 and ledger.y1 <= 300 / 999 * 792 + 2


def test_deepseek_grounded_page_exports_at_its_boxes(sqlite_url: str, tmp_path: Path) -> None:
    """A DeepSeek-OCR transcript of a scan (boxes in 0..999 bins), parsed and stored as the
    pipeline stores it, comes back as a text layer on the printed lines."""
    from infra.db import repository
    from infra.db.models import PageStatus
    from infra.db.repository import AttemptRecord, DocumentIdentity, PageRecord, RetryPolicy
    from models.deepseek_ocr.grounding import parse_grounded_output
    from tasks.fetch import sha256_of

    digital = make_born_digital(tmp_path / "digital.pdf", pages=1)
    scan = rasterise(digital, tmp_path / "scan.pdf")
    printed = pymupdf.open(digital)[0]
    width, height = printed.rect.width, printed.rect.height
    transcript = ""
    for row, line in enumerate(LINES):
        rect = printed.search_for(f"{line} 1")[0]
        bins = [round(rect.x0 / width * 999), round(rect.y0 / height * 999)]
        bins += [round(rect.x1 / width * 999), round(rect.y1 / height * 999)]
        label = "title" if row == 0 else "text"
        transcript += f"<|ref|>{label}<|/ref|><|det|>[{bins}]<|/det|>\n{line} 1\n\n"
    parsed = parse_grounded_output(transcript, page_width=width, page_height=height)
    attempt = AttemptRecord(
        result_fields={
            "route": "ocr", "mode": "base", "engine": "deepseek-ocr", "model_revision": "test",
            "markdown": parsed.markdown, "raw_output": transcript, "finish_reason": "eos",
            "accepted": True, "rejection_reason": None,
            "blocks": [
                {"label": b.label, "text": b.text, "boxes_bins": b.boxes_bins,
                 "boxes_page": b.boxes_page}
                for b in parsed.blocks
            ],
        },
        token_fields=None,
    )  # fmt: skip
    with session_scope(sqlite_url) as session:
        identity = DocumentIdentity(str(scan), sha256_of(scan), scan.stat().st_size)
        claim = repository.claim_document(
            session=session, identity=identity, pipeline_version="test", lease_seconds=60
        )
        repository.set_page_count(
            session=session, document_id=claim.document_id, page_count=1, media_type="pdf"
        )
        record = PageRecord(
            1, width, height, {"route": "ocr", "status": PageStatus.DONE}, [attempt]
        )
        repository.record_page(
            session=session, document_id=claim.document_id, page=record,
            retry=RetryPolicy(max_failures=3, base_seconds=1, max_seconds=1),
        )  # fmt: skip

    written, failures = export_documents(
        database_url=sqlite_url, document_ids=[claim.document_id], formats=[ExportFormat.PDF],
        out=str(tmp_path / "out"),
    )  # fmt: skip
    assert failures == []
    page = pymupdf.open(written[0].path)[0]
    assert words(page.get_text()) == words(plain_text(parsed.markdown))
    for line in LINES:
        found, target = page.search_for(line)[0], printed.search_for(line)[0]
        assert abs(found.y0 - target.y0) < 4 and abs(found.x0 - target.x0) < 4, line


def test_alto_has_the_required_structure(ingested, tmp_path: Path) -> None:
    url, _, scan_id, _ = ingested
    written, _ = export_documents(
        database_url=url, document_ids=[scan_id], formats=[ExportFormat.ALTO], out=str(tmp_path)
    )
    root = ET.parse(written[0].path).getroot()  # well-formed
    assert root.tag == f"{A}alto"
    assert root.find(f"{A}Description/{A}MeasurementUnit").text == "inch1200"
    pages = root.findall(f"{A}Layout/{A}Page")
    scan = stored(url, scan_id)
    assert len(pages) == len(scan.pages)
    ids = [element.get("ID") for element in root.iter() if element.get("ID")]
    assert len(ids) == len(set(ids)) and all(i[0].isalpha() for i in ids)
    for element, page in zip(pages, scan.pages, strict=True):
        assert element.get("PHYSICAL_IMG_NR") == str(page.page_no)
        width, height = float(element.get("WIDTH")), float(element.get("HEIGHT"))
        assert width == pytest.approx(page.width * 1200 / 72, abs=0.01)
        assert [child.tag for child in element] == [f"{A}PrintSpace"]
        strings = []
        for block in element.iter(f"{A}TextBlock"):
            assert block.get("ID") and block.findall(f"{A}TextLine")
            for line in block.findall(f"{A}TextLine"):
                children = [child.tag.removeprefix(A) for child in line]
                assert children[0] == "String" and children[-1] == "String"
                assert set(children) <= {"String", "SP"}
                for string in line.findall(f"{A}String"):
                    x, y = float(string.get("HPOS")), float(string.get("VPOS"))
                    w, h = float(string.get("WIDTH")), float(string.get("HEIGHT"))
                    assert x >= 0 and x + w <= width + 1 and y >= 0 and y + h <= height + 1
                    strings.append(string.get("CONTENT"))
        assert strings == words(plain_text(page.markdown))


def test_text_formats_carry_the_stored_results(ingested, tmp_path: Path) -> None:
    url, digital_id, _, _ = ingested
    formats = [ExportFormat.MD, ExportFormat.TXT, ExportFormat.JSON, ExportFormat.JSONL]
    written, _ = export_documents(
        database_url=url, document_ids=[digital_id], formats=formats, out=str(tmp_path)
    )
    files = {file.format: Path(file.path) for file in written}
    document = stored(url, digital_id)
    assert LINES[1] in files["md"].read_text()
    assert files["txt"].read_text().count("\f") == len(document.pages) - 1
    assert (
        json.loads(files["json"].read_text())["pages"][1]["markdown"] == document.pages[1].markdown
    )
    rows = [json.loads(line) for line in files["jsonl"].read_text().splitlines()]
    assert [(r["document_id"], r["page_no"]) for r in rows] == [(digital_id, 1), (digital_id, 2)]


def test_s3_write_back_and_export_to_s3_use_the_exporters(ingested, s3_bucket: str) -> None:
    from infra.db.queries import document_view
    from infra.s3 import s3_client
    from infra.settings import Settings
    from tasks.results_s3 import write_results
    from tasks.s3_source import head_s3_object

    url, _, scan_id, _ = ingested
    document = stored(url, scan_id)
    body = Path(document.source_uri).read_bytes()
    s3_client().put_object(Bucket=s3_bucket, Key="in/scan.pdf", Body=body)
    with session_scope(url) as session:
        view = document_view(session=session, document_id=scan_id)
    source = head_s3_object(f"s3://{s3_bucket}/in/scan.pdf")
    written = write_results(source, view, Settings(results_prefix="out/"), document=document)
    names = sorted(uri.rsplit("/", 1)[-1] for uri in written)
    assert names == [
        "document.alto.xml",
        "document.json",
        "document.md",
        "document.pdf",
        "document.txt",
    ]
    key = next(uri for uri in written if uri.endswith(".pdf")).removeprefix(f"s3://{s3_bucket}/")
    pdf = pymupdf.open("pdf", s3_client().get_object(Bucket=s3_bucket, Key=key)["Body"].read())
    assert words(pdf[0].get_text()) == words(plain_text(document.pages[0].markdown))

    exported, failures = export_documents(
        database_url=url, document_ids=[scan_id], formats=[ExportFormat.JSONL],
        out=f"s3://{s3_bucket}/exports",
    )  # fmt: skip
    assert (
        failures == [] and exported[0].path == f"s3://{s3_bucket}/exports/document-{scan_id}.jsonl"
    )


def test_pdf_export_of_an_s3_document_checks_its_content(ingested, s3_bucket, tmp_path) -> None:
    from sqlalchemy import update

    from infra.db.models import Document
    from infra.s3 import s3_client

    url, _, scan_id, _ = ingested
    local = stored(url, scan_id).source_uri
    uri = f"s3://{s3_bucket}/in/scan.pdf"
    s3_client().put_object(Bucket=s3_bucket, Key="in/scan.pdf", Body=Path(local).read_bytes())

    def point_at(source: str) -> None:
        with session_scope(url) as session:
            session.execute(
                update(Document).where(Document.id == scan_id).values(source_uri=source)
            )

    point_at(uri)  # as if the scan had been ingested from the bucket
    try:
        written, failures = export_documents(
            database_url=url, document_ids=[scan_id], formats=[ExportFormat.PDF], out=str(tmp_path)
        )
        assert failures == []
        assert pymupdf.open(written[0].path)[0].get_text().split()

        s3_client().put_object(Bucket=s3_bucket, Key="in/scan.pdf", Body=b"%PDF-1.7 other bytes")
        _, failures = export_documents(
            database_url=url, document_ids=[scan_id], formats=[ExportFormat.PDF], out=str(tmp_path)
        )
        assert len(failures) == 1 and "changed since it was ingested" in failures[0].error
    finally:
        point_at(local)


def test_cli_export_json_and_a_changed_source(
    ingested, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.cli import app

    url, digital_id, scan_id, digital = ingested
    monkeypatch.setenv("OCRFLOW_DATABASE_URL", url)
    out = tmp_path / "exports"
    arguments = [str(scan_id), str(digital_id), "-f", "pdf", "-f", "alto", "--out", str(out)]
    result = CliRunner().invoke(app, ["export", *arguments, "--json"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    assert {(f["document_id"], f["format"]) for f in listed} == {
        (scan_id, "pdf"), (scan_id, "alto"), (digital_id, "pdf"), (digital_id, "alto")
    }  # fmt: skip
    assert all(Path(f["path"]).is_file() for f in listed)

    original = digital.read_bytes()
    make_born_digital(digital, pages=3)  # the source changed since it was ingested
    try:
        changed = CliRunner().invoke(
            app, ["export", str(digital_id), str(scan_id), "--out", str(tmp_path / "2"), "--json"]
        )
    finally:
        digital.write_bytes(original)
    assert changed.exit_code == 1
    assert [f["document_id"] for f in json.loads(changed.stdout)] == [scan_id]
    assert "changed since it was ingested" in changed.stderr
