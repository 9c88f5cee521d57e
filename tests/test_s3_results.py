"""Results written back to S3: keys derived from hostile source keys never leave the results
prefix and never share a folder; markdown, JSON and cropped figures land under it."""

from __future__ import annotations

import json
import posixpath
import random

import pymupdf
import pytest

from infra.s3 import S3Location, s3_client
from infra.settings import Settings
from tasks.results_s3 import is_results_key, results_folder, safe_relative_key, write_results
from tasks.s3_source import head_s3_object

HOSTILE_KEYS = [
    "../../etc/passwd",
    "/etc/passwd",
    "a/../../../b",
    "..",
    "./.",
    "a//b",
    "..\\..\\windows\\system32",
    "ctrl\x00\x07\x1b[31m\r\nname.pdf",
    "bidi\u202egnp.exe",
    "zero\u200bwidth",
    "e\u0301clair.pdf",  # decomposed é
    "%2e%2e/%2e%2e/x",
    "x" * 2000,
    "",
]


@pytest.mark.parametrize("key", HOSTILE_KEYS)
def test_hostile_keys_stay_inside_the_results_prefix(key):
    settings = Settings(results_prefix="results/")
    folder = results_folder(S3Location("archive", key), settings)
    assert folder.bucket == "archive"
    assert folder.key.startswith("results/archive/")
    assert posixpath.normpath(folder.key).startswith("results/archive/")
    segments = folder.key.removeprefix("results/").rstrip("/").split("/")
    assert all(segment.strip(".") for segment in segments)
    assert all(ch.isprintable() for ch in folder.key)
    assert len(folder.key.encode()) < 1024 - 64  # room for file names


def test_plain_keys_keep_their_shape_and_changed_keys_do_not_collide():
    assert safe_relative_key("scans/2024/report.pdf") == "scans/2024/report.pdf"
    assert safe_relative_key("a?b") != safe_relative_key("a*b")
    assert safe_relative_key("a/../b") != safe_relative_key("a/b")


def test_a_key_shaped_like_another_keys_hashed_folder_gets_its_own():
    # Once both mapped to in/x.pdf~<hash>, and the second overwrote the first's document.json.
    awkward = "in//x.pdf"
    lookalike = safe_relative_key(awkward)
    assert lookalike.startswith("in/x.pdf~")
    settings = Settings(results_prefix="results/")
    first = results_folder(S3Location("archive", awkward), settings)
    second = results_folder(S3Location("archive", lookalike), settings)
    assert first != second
    assert safe_relative_key(lookalike) != lookalike  # it is hashed in turn
    assert safe_relative_key("in/x.pdf~0123abcd") == "in/x.pdf~0123abcd"  # not hash-shaped


AWKWARD_PIECES = [
    "a",
    "b",
    "x.pdf",
    "/",
    "//",
    ".",
    "..",
    "~",
    " ",
    "%2F",
    "\\",
    "\x00",
    "\r\n",
    "\u202e",
    "e\u0301",
    "\u00e9",
    "\u200b",
    "?",
    "*",
    "#",
    "+",
    "~" + "0" * 32,
    "~" + "f" * 12,
    "_",
    "\ud800",
    "\U0001f600",
    "x" * 300,
]


def awkward_keys(count: int, seed: int = 20261202) -> list[str]:
    """Random keys built from the pieces that trip sanitising up, plus each one's sanitised
    and hashed forms (the keys an attacker would pick to collide with it)."""
    rng = random.Random(seed)
    keys = {"".join(rng.choices(AWKWARD_PIECES, k=rng.randint(0, 8))) for _ in range(count)}
    keys |= {safe_relative_key(key) for key in list(keys)}
    keys |= {key.rstrip("/") + "/" for key in list(keys)}
    keys |= {"in//x.pdf", "in/x.pdf", "in/./x.pdf", "in/x.pdf/", "/in/x.pdf", "in/x.pdf~"}
    return sorted(keys)


def test_no_two_keys_share_a_results_folder_and_none_leaves_the_prefix():
    settings = Settings(results_prefix="results/")
    folders: dict[str, str] = {}
    for key in awkward_keys(4000):
        folder = results_folder(S3Location("archive", key), settings).key
        assert folders.setdefault(folder, key) == key, f"{key!r} and {folders[folder]!r} meet"
        assert posixpath.normpath(folder).startswith("results/archive/")
        segments = folder.removeprefix("results/archive/").rstrip("/").split("/")
        assert all(segment.strip(".") for segment in segments), folder
        assert len(folder.encode()) < 1024 - 64
    assert len(folders) > 8000


def test_results_in_another_bucket_and_own_results_are_recognised():
    settings = Settings(results_prefix="s3://outputs/ocr")
    folder = results_folder(S3Location("archive", "x.pdf"), settings)
    assert (folder.bucket, folder.key) == ("outputs", "ocr/archive/x.pdf/")
    assert is_results_key("outputs", "ocr/archive/x.pdf/document.md", settings)
    assert not is_results_key("archive", "ocr/x.pdf", settings)


def test_results_are_written_with_markdown_json_and_cropped_figures(s3_bucket):
    document = pymupdf.open()
    page = document.new_page()
    page.insert_text((72, 60), "Annual report")
    figure = pymupdf.Pixmap(pymupdf.csRGB, pymupdf.IRect(0, 0, 40, 30), False)
    figure.set_rect(figure.irect, (200, 30, 30))
    page.insert_image(pymupdf.Rect(100, 100, 300, 250), pixmap=figure)
    s3_client().put_object(Bucket=s3_bucket, Key="../reports/2024.pdf", Body=document.tobytes())
    view = {
        "id": 7,
        "pages": [
            {
                "number": 1,
                "markdown": "# Annual report",
                "blocks": [
                    {"label": "title", "text": "Annual report", "boxes_page": [[72, 50, 200, 62]]},
                    {"label": "image", "text": "", "boxes_page": [[100, 100, 300, 250]]},
                ],
            }
        ],
    }
    settings = Settings(results_prefix="out/", render_dpi=72)

    written = write_results(head_s3_object(f"s3://{s3_bucket}/../reports/2024.pdf"), view, settings)

    folder = f"s3://{s3_bucket}/out/{s3_bucket}/reports/2024.pdf~"
    assert len(written) == 3 and all(uri.startswith(folder) for uri in written)
    bodies = {
        uri.rsplit("/", 1)[-1]: s3_client()
        .get_object(Bucket=s3_bucket, Key=uri.removeprefix(f"s3://{s3_bucket}/"))["Body"]
        .read()
        for uri in written
    }
    assert bodies["document.md"] == b"# Annual report"
    assert json.loads(bodies["document.json"])["pages"][0]["blocks"][1]["label"] == "image"
    crop = pymupdf.Pixmap(bodies["page-0001-01.png"])
    assert (crop.width, crop.height) == (200, 150)  # the figure's box at 72 dpi
    assert crop.pixel(100, 75)[:3] == (200, 30, 30)  # its pixels, not the page around it
