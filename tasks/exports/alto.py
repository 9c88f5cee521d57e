"""ALTO XML v4 (4.2): pages, text blocks, lines and words with coordinates.

Coordinates are in the unit the document's pages are stored in, declared in `MeasurementUnit`:
ALTO has no PDF points, so PDF-like sources are written in `inch1200` (1 pt = 1200/72) and
image sources, whose pages are pixels, in `pixel`. Word boxes are shared out along the line
by width (engines store lines and blocks, not words).

What the 4.2 schema requires, and every file here has: `Description/MeasurementUnit`,
`Layout/Page` with `ID` and `PHYSICAL_IMG_NR`, an `ID` on each block, `CONTENT` on each
`String`; IDs are XML names (they start with a letter), unique in the file.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from tasks.exports.document import ExportDocument, ExportPage
from tasks.exports.layout import Box, line_words, page_layout

ALTO_NAMESPACE = "http://www.loc.gov/standards/alto/ns-v4#"
SCHEMA_LOCATION = f"{ALTO_NAMESPACE} http://www.loc.gov/standards/alto/v4/alto-4-2.xsd"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
POINTS_TO_INCH1200 = 1200 / 72


def measurement_unit(document: ExportDocument) -> tuple[str, float]:
    """The ALTO unit for this document's pages and the factor from stored coordinates."""
    if (document.media_type or "").startswith("image/"):
        return "pixel", 1.0
    return "inch1200", POINTS_TO_INCH1200


def render_alto(document: ExportDocument, *, software_version: str) -> bytes:
    ET.register_namespace("", ALTO_NAMESPACE)
    ET.register_namespace("xsi", XSI)
    unit, factor = measurement_unit(document)
    alto = ET.Element(_tag("alto"), {f"{{{XSI}}}schemaLocation": SCHEMA_LOCATION})
    description = ET.SubElement(alto, _tag("Description"))
    ET.SubElement(description, _tag("MeasurementUnit")).text = unit
    source = ET.SubElement(description, _tag("sourceImageInformation"))
    ET.SubElement(source, _tag("fileName")).text = document.source_uri
    processing = ET.SubElement(description, _tag("Processing"), {"ID": "PROC1"})
    software = ET.SubElement(processing, _tag("processingSoftware"))
    ET.SubElement(software, _tag("softwareName")).text = "ocrflow"
    ET.SubElement(software, _tag("softwareVersion")).text = software_version
    layout = ET.SubElement(alto, _tag("Layout"))
    for page in document.pages:
        _page(layout, page, factor)
    ET.indent(alto)
    return ET.tostring(alto, encoding="utf-8", xml_declaration=True)


def _page(layout: ET.Element, page: ExportPage, factor: float) -> None:
    prefix = f"P{page.page_no}"
    element = ET.SubElement(
        layout,
        _tag("Page"),
        {
            "ID": prefix,
            "PHYSICAL_IMG_NR": str(page.page_no),
            **_size(page.width * factor, page.height * factor),
        },
    )
    print_space = ET.SubElement(
        element, _tag("PrintSpace"), _position((0, 0, page.width, page.height), factor)
    )
    for b, block in enumerate(page_layout(page), start=1):
        block_id = f"{prefix}_B{b}"
        text_block = ET.SubElement(
            print_space, _tag("TextBlock"), {"ID": block_id, **_position(block.box, factor)}
        )
        for n, line in enumerate(block.lines, start=1):
            line_id = f"{block_id}_L{n}"
            text_line = ET.SubElement(
                text_block, _tag("TextLine"), {"ID": line_id, **_position(line.box, factor)}
            )
            words = line_words(line)
            for w, (word, box) in enumerate(words, start=1):
                if w > 1:  # the space between two words, from the end of one to the next
                    previous = words[w - 2][1]
                    gap = (previous[2], box[1], max(box[0], previous[2]), box[3])
                    ET.SubElement(text_line, _tag("SP"), _position(gap, factor, height=False))
                ET.SubElement(
                    text_line,
                    _tag("String"),
                    {"ID": f"{line_id}_S{w}", "CONTENT": word, **_position(box, factor)},
                )


def _tag(name: str) -> str:
    return f"{{{ALTO_NAMESPACE}}}{name}"


def _number(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".")


def _size(width: float, height: float) -> dict[str, str]:
    return {"WIDTH": _number(width), "HEIGHT": _number(height)}


def _position(box: Box, factor: float, *, height: bool = True) -> dict[str, str]:
    x0, y0, x1, y1 = (value * factor for value in box)
    position = {"HPOS": _number(x0), "VPOS": _number(y0), "WIDTH": _number(x1 - x0)}
    if height:
        position["HEIGHT"] = _number(y1 - y0)
    return position
