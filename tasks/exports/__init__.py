"""Exports of stored results: searchable PDF, ALTO XML, markdown, plain text, JSON and JSONL.

`ocrflow export` and the S3 write-back both go through `tasks.exports.writer`, so a document
exported by hand and one written back to S3 are the same bytes.
"""
