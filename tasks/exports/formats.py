"""The export formats, their file suffixes and content types (light: the CLI imports it)."""

from __future__ import annotations

from enum import StrEnum


class ExportFormat(StrEnum):
    PDF = "pdf"
    MD = "md"
    JSON = "json"
    TXT = "txt"
    ALTO = "alto"
    JSONL = "jsonl"


SUFFIXES = {
    ExportFormat.PDF: ".pdf",
    ExportFormat.MD: ".md",
    ExportFormat.JSON: ".json",
    ExportFormat.TXT: ".txt",
    ExportFormat.ALTO: ".alto.xml",
    ExportFormat.JSONL: ".jsonl",
}
CONTENT_TYPES = {
    ExportFormat.PDF: "application/pdf",
    ExportFormat.MD: "text/markdown; charset=utf-8",
    ExportFormat.JSON: "application/json",
    ExportFormat.TXT: "text/plain; charset=utf-8",
    ExportFormat.ALTO: "application/xml",
    ExportFormat.JSONL: "application/x-ndjson",
}
