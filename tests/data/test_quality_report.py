"""The data-quality report MLflow's artifact viewer shows: one self-contained HTML file (no
CDN, no script, the chart inline) and a PNG; GX's own pages stripped of their CDN tags."""

from __future__ import annotations

import base64
import re
from pathlib import Path

from PIL import Image

from visionflow.data.quality_report import HTML_NAME, PNG_NAME, offline_data_docs, write_report

SUMMARY = {
    "success": False, "source": "data/digits", "data_hash": "a5b079f87d32942d931f07f9b426c6a1",
    "files": 12, "usable": 11, "quarantined": {"truncated": 1},
    "classes": ["0", "1"], "counts": {"train": {"0": 3, "1": 3}, "val": {"0": 1, "1": 1},
                                      "test": {"0": 2, "1": 1}},
    "expectations": [
        {"expectation": "expect_column_values_to_be_in_set", "column": "split", "success": True,
         "observed": "0 unexpected (0.00%)", "description": "split is train/val/test",
         "examples": []},
        {"expectation": "expect_column_min_to_be_between", "column": "train_count",
         "success": False, "observed": 3, "description": "each class has 5 train images",
         "examples": ["0", "1"]}],
}
GX_PAGE = """<html><head>
<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/bootstrap@4/dist/css/bootstrap.min.css">
<script src="https://code.jquery.com/jquery-3.2.1.min.js"></script>
<script src="//cdnjs.cloudflare.com/ajax/libs/font-awesome.js"></script>
</head><body><p>GX</p><script>var local = 1;</script></body></html>"""


def test_report_is_one_offline_file_with_a_png(tmp_path: Path):
    gx = tmp_path / "docs" / "validations" / "x.html"
    gx.parent.mkdir(parents=True)
    gx.write_text(GX_PAGE)
    html_path, png_path = write_report(SUMMARY, tmp_path / "docs")
    assert (html_path.name, png_path.name) == (HTML_NAME, PNG_NAME)
    text = html_path.read_text()
    assert not re.search(r"(src|href)=[\"']?(https?:)?//", text), "a remote resource"
    assert "<script" not in text and "<link" not in text and "<style>" in text
    for shown in ("a5b079f87d32942d931f07f9b426c6a1", "FAIL", "each class has 5 train images",
                  "expect_column_values_to_be_in_set", "truncated: 1", "11 usable"):
        assert shown in text, shown
    inline = re.search(r'src="data:image/png;base64,([^"]+)"', text).group(1)
    assert base64.b64decode(inline) == png_path.read_bytes()
    with Image.open(png_path) as im:
        assert im.format == "PNG" and im.size[0] >= 600
    page = gx.read_text()  # GX's pages: no CDN tags left, the inline stylesheet added
    assert "cdn" not in page and "jquery" not in page and "<style>" in page
    assert "var local = 1" in page
    assert offline_data_docs(tmp_path / "docs") == 0  # idempotent
