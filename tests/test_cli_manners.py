"""The `ocrflow` command behaves like a mature tool: it starts fast, keeps stdout for results
(one JSON document with `--json`, whatever MuPDF thinks of a file), says one line per failed
document without tracebacks, reads at 80 columns, and names what a skipped file duplicates.

Every command here runs the real CLI in its own process, as a user would.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pymupdf
import pytest

from tests.conftest import REPO_ROOT, SAMPLES_DIR

HEAVY_MODULES = ("torch", "prefect", "pymupdf", "fitz", "boto3", "numpy", "rapidocr")


def user_environment(**extra: str) -> dict[str, str]:
    """This environment without the PyMuPDF message routing that importing `flows` set in it:
    a user's shell does not have it, and the CLI must set it up by itself."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYMUPDF_")}
    return env | extra


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=REPO_ROOT,
        env=user_environment(**(env or {})),
        capture_output=True,
        text=True,
        timeout=600,
    )


def loaded_after(code: str, env: dict[str, str] | None = None) -> set[str]:
    """The heavy top-level modules a fresh interpreter holds after running `code`."""
    probe = f"""
import json, sys
{code}
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY_MODULES!r})))
"""
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=REPO_ROOT,
        env=user_environment(**(env or {})),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return {name.split(".")[0] for name in json.loads(done.stdout.splitlines()[-1])}


def pdf_with_unusable_font(path: Path) -> Path:
    """A text page whose font descriptor points at a FontFile3 without a /Subtype: reading the
    page's fonts makes PyMuPDF print `unhandled font type ''` to stdout."""
    document = pymupdf.open()
    page = document.new_page()
    page.insert_text((72, 72), "A page whose font program is unusable", fontsize=12)
    font_xref = page.get_fonts()[0][0]
    program = document.get_new_xref()
    document.update_object(program, "<< >>")
    document.update_stream(program, b"not a font program")
    descriptor = document.get_new_xref()
    document.update_object(
        descriptor, f"<< /Type /FontDescriptor /FontName /Helvetica /FontFile3 {program} 0 R >>"
    )
    document.xref_set_key(font_xref, "FontDescriptor", f"{descriptor} 0 R")
    document.save(path)
    return path


def text_pdf(path: Path, words: str, pages: int = 2) -> Path:
    document = pymupdf.open()
    for number in range(1, pages + 1):
        document.new_page().insert_text((72, 72), f"{words} {number}", fontsize=12)
    document.save(path)
    return path


# Start-up ---------------------------------------------------------------------------------


def test_importing_the_cli_loads_no_prefect_pymupdf_or_torch():
    assert loaded_after("import flows.cli") == set()


def test_help_and_stats_run_without_the_heavy_libraries(tmp_path):
    help_run = "from flows.cli import app\ntry: app(['--help'])\nexcept SystemExit: pass"
    assert loaded_after(help_run) == set()
    stats_run = "from flows.cli import app\ntry: app(['stats', '--json'])\nexcept SystemExit: pass"
    url = f"sqlite:///{tmp_path / 'stats.db'}"
    subprocess.run(
        [sys.executable, "-m", "flows.cli", "db", "upgrade"],
        cwd=REPO_ROOT,
        env=user_environment(OCRFLOW_DATABASE_URL=url),
        check=True,
        capture_output=True,
    )
    assert loaded_after(stats_run, {"OCRFLOW_DATABASE_URL": url}) == set()


# stdout holds one JSON document ----------------------------------------------------------


def test_the_test_file_really_makes_pymupdf_print_to_stdout(tmp_path):
    """Without ocrflow's routing, this file pollutes stdout: the next test means something."""
    pdf = pdf_with_unusable_font(tmp_path / "font.pdf")
    plain = subprocess.run(
        [sys.executable, "-c", f"import pymupdf; pymupdf.open({str(pdf)!r})[0].get_fonts()"],
        env=user_environment(),
        capture_output=True,
        text=True,
        check=True,
    )
    assert "unhandled font type" in plain.stdout


def test_plan_json_is_one_json_document_when_mupdf_complains(tmp_path):
    pdf = pdf_with_unusable_font(tmp_path / "font.pdf")
    result = run_cli("plan", "--json", str(pdf))
    assert result.returncode == 0, result.stderr
    [plan] = json.loads(result.stdout)  # nothing but the JSON array on stdout
    assert plan["pages"][0]["route"] == "text-layer"
    assert "unhandled font type" in result.stderr  # MuPDF's complaint went to the log


# plan at 80 columns ----------------------------------------------------------------------


def test_plan_at_80_columns_prints_each_reason_as_readable_lines():
    samples = [str(SAMPLES_DIR / name) for name in ("report.pdf", "scan.pdf", "two_column.pdf")]
    plans = json.loads(run_cli("plan", "--json", *samples).stdout)
    table = run_cli("plan", *samples, env={"COLUMNS": "80"})
    assert table.returncode == 0, table.stderr

    lines = table.stdout.splitlines()
    assert max(map(len, lines)) <= 80
    # A reason squeezed into a column is cut into a word or two per line, between borders;
    # printed as a paragraph it reads whole once the line breaks are taken out.
    flowing = " ".join(table.stdout.split())
    for plan in plans:
        for page in plan["pages"]:
            assert " ".join(f"page {page['page_no']}: {page['reason']}".split()) in flowing


def test_plan_on_a_wide_terminal_keeps_the_reason_column():
    result = run_cli("plan", str(SAMPLES_DIR / "scan.pdf"), env={"COLUMNS": "200"})
    header = next(line for line in result.stdout.splitlines() if "page" in line)
    assert "reason" in header
    assert "[" in result.stdout  # the engine tag in brackets is printed, not eaten as markup


def test_plan_of_a_path_without_documents_warns_and_exits_1(tmp_path):
    result = run_cli("plan", "--json", str(tmp_path))
    assert result.returncode == 1
    assert json.loads(result.stdout) == []
    assert "no documents found" in result.stderr


# ingest: quiet failures, duplicates, and one console -------------------------------------


@pytest.fixture
def cli_env(prefect_server, sqlite_url: str) -> dict[str, str]:
    """The test's Prefect server and a fresh SQLite database, for CLI subprocesses."""
    from prefect.settings import PREFECT_API_URL

    return {"PREFECT_API_URL": PREFECT_API_URL.value(), "OCRFLOW_DATABASE_URL": sqlite_url}


def test_ingest_reports_a_failed_document_in_one_line_without_a_traceback(cli_env, tmp_path):
    good = text_pdf(tmp_path / "good.pdf", "quiet run")
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.7 not really")
    complaining = pdf_with_unusable_font(tmp_path / "font.pdf")

    quiet = run_cli("ingest", "--json", str(good), str(broken), str(complaining), env=cli_env)
    assert quiet.returncode == 1
    outcomes = json.loads(quiet.stdout)  # MuPDF's complaint about font.pdf is not in stdout
    assert [o["status"] for o in outcomes] == ["done", "failed", "done"]
    assert "Traceback" not in quiet.stderr
    mentions = [line for line in quiet.stderr.splitlines() if "broken.pdf" in line]
    assert len(mentions) == 1 and "failed" in mentions[0]
    assert "Task run" not in quiet.stderr and "Finished in state" not in quiet.stderr

    broken_again = tmp_path / "broken-again.pdf"  # new content: failed again, not skipped
    broken_again.write_bytes(b"%PDF-1.7 still not")
    verbose = run_cli("--verbose", "ingest", "--json", str(broken_again), env=cli_env)
    assert verbose.returncode == 1
    assert json.loads(verbose.stdout)[0]["status"] == "failed"
    assert "Traceback" in verbose.stderr and "Finished in state" in verbose.stderr
    finished = [line for line in verbose.stderr.splitlines() if "Finished in state" in line]
    assert all(re.match(r"\d\d:\d\d:\d\d\.\d{3} ", line) for line in finished)  # ms: start-up
    assert "ingest flow imported in" in verbose.stderr
    assert "ingest flow imported" not in quiet.stderr


def test_a_skipped_duplicate_names_the_document_it_duplicates(cli_env, tmp_path):
    original = text_pdf(tmp_path / "ledger.pdf", "duplicate check", pages=3)
    first = run_cli("ingest", "--json", str(original), env=cli_env)
    [done] = json.loads(first.stdout)
    copy = Path(shutil.copy(original, tmp_path / "ledger-copy.pdf"))

    again = run_cli("ingest", "--json", str(copy), env=cli_env)
    assert again.returncode == 0, again.stderr
    [skipped] = json.loads(again.stdout)
    assert skipped["status"] == "skipped"
    assert skipped["pages"] == 3
    assert skipped["duplicate_of"] == {"id": done["id"], "source": str(original)}

    table = run_cli("ingest", str(copy), env={**cli_env, "COLUMNS": "400"})  # no wrapping
    assert f"same content as document {done['id']} ({original})" in table.stdout
    # The summary's pages, one row each (once one table cell of Python reprs).
    assert "[{" not in table.stdout and "by_page" not in table.stdout
    lines = table.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[-1:] == ["attempts"])
    assert lines[header - 1].split() == ["vision", "output"]
    assert lines[header].split() == [
        "doc", "page", "status", "route", "mode", "engine", "tokens", "tokens", "attempts"
    ]  # fmt: skip
    rows = [line.split() for line in lines[header + 2 : header + 5]]  # no mode: 8 cells
    assert [row[:2] for row in rows] == [[str(done["id"]), str(n)] for n in (1, 2, 3)]
    assert all(row[2:5] == ["done", "text-layer", "pymupdf-text"] for row in rows)
    assert all(row[5] == "0" and int(row[6]) > 0 and row[7] == "1" for row in rows)


def test_a_long_runs_summary_points_to_its_pages_instead_of_listing_them(capsys) -> None:
    from flows.cli import PAGE_TABLE_LIMIT, _print_stats

    page = {"document_id": 1, "status": "done", "route": "ocr", "mode": "base",
            "engine": "deepseek-ocr", "planned_vision_tokens": 256, "output_tokens": 700,
            "attempts": 1}  # fmt: skip
    for pages in (PAGE_TABLE_LIMIT, PAGE_TABLE_LIMIT + 1):
        _print_stats(
            {"documents": {"done": 1}, "by_page": [{**page, "page": n} for n in range(pages)]}
        )
        printed = capsys.readouterr().out
        listed = [line for line in printed.splitlines() if "deepseek-ocr" in line]
        if pages == PAGE_TABLE_LIMIT:
            assert len(listed) == pages
        else:
            assert not listed
            assert (
                f"{pages} pages: per-page figures with `ocrflow show DOC_ID --format json`"
                in printed
            )


def test_in_a_terminal_log_lines_print_above_the_progress_bar_not_into_it(cli_env, tmp_path):
    """Run under a pseudo-terminal, where the bar is live: the failure's log line stands alone."""
    import pty
    import re

    good = text_pdf(tmp_path / "first.pdf", "terminal run")
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.7 not really")
    controller, terminal = pty.openpty()
    env = user_environment(**cli_env, TERM="xterm-256color", COLUMNS="200", LINES="50")
    env.pop("NO_COLOR", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "ingest", str(broken), str(good)],
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=terminal,
        stderr=terminal,
    )
    os.close(terminal)
    screen = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        screen += chunk
    assert process.wait(timeout=600) == 1
    os.close(controller)

    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.decode(errors="replace"))
    segments = [s for s in re.split(r"[\r\n]", text) if "broken.pdf failed" in s]
    assert segments, text[-2000:]
    assert all("━" not in s and "ingest" not in s.split("warning:")[0] for s in segments)


def test_the_run_summary_lists_every_document_with_its_id_and_show_command(
    prefect_server, sqlite_url: str, monkeypatch, tmp_path
):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.ingest import ingest

    monkeypatch.setenv("OCRFLOW_DATABASE_URL", sqlite_url)
    good = text_pdf(tmp_path / "summary.pdf", "summary artifact", pages=2)
    broken = tmp_path / "summary-broken.pdf"
    broken.write_bytes(b"%PDF-1.7 not really")
    outcomes = ingest([str(good), str(broken)])

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["ingest-documents"]))
        )
    markdown = max(artifacts, key=lambda artifact: artifact.created).data
    header, _rule, *lines = markdown.splitlines()
    assert "tokens" in header and "by mode" in header
    rows = {
        cells[0]: cells for cells in ([c.strip() for c in ln.strip("|").split("|")] for ln in lines)
    }
    done, failed = (rows[str(outcome["id"])] for outcome in outcomes)
    assert done[1:5] == [str(good), "done", "2", "text-layer 2"]
    assert done[7] == f"`ocrflow show {outcomes[0]['id']}`"
    assert failed[2].startswith("failed: ") and failed[7] == f"`ocrflow show {outcomes[1]['id']}`"


def test_command_help_reads_as_sentences_not_as_the_docstrings_line_breaks() -> None:
    """Docstrings wrap at the source's width; the command list re-wraps them at the
    terminal's instead of breaking each line where the source did."""
    listing = subprocess.run(
        [sys.executable, "-c", "from flows.cli import app\napp(['--help'])"],
        cwd=REPO_ROOT,
        env=os.environ | {"COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listing.returncode == 0, listing.stderr
    redrive = next(line for line in listing.stdout.splitlines() if " redrive " in line)
    assert "resume documents left incomplete or whose run died" in redrive
