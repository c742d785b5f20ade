"""The GX suite and the gate: hard expectations named, Data Docs, the console table, the
row cache and the suite memo."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from builders import BASE, write_imagefolder
from helpers import make_project
from PIL import Image

from visionflow.core.configfile import load_params
from visionflow.core.errors import ValidationFailed
from visionflow.core.layout import Layout
from visionflow.data import expectations
from visionflow.data.manifest import data_hash
from visionflow.data.survey import row_cache_file, survey_dataset
from visionflow.orchestration.stage_runner import run_stage
from visionflow.stages import validate


def _validate(root: Path, overrides: list[str] | None = None):
    layout = Layout.at(root)
    return run_stage("validate", load_params(layout.params, overrides or []), layout), layout


def _age(folder: Path, seconds: float = 3600) -> None:
    """Move mtimes into the past (the row cache re-hashes files modified just now)."""
    past = time.time() - seconds
    for p in folder.rglob("*"):
        if p.is_file():
            os.utime(p, (past, past))


# ---------------------------------------------------------------------------
# every hard expectation fails on its violation, named with examples


@pytest.fixture(scope="module")
def violations(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("violations")
    data = write_imagefolder(tmp / "src", {**BASE, "test/bird": 2})
    cat = data / "train" / "cat"
    shutil.copy(cat / "000.png", cat / "dup.png")  # duplicate within train
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (100, 100, 3), dtype=np.uint8)
                    ).save(cat / "big.png")  # 100x100: too wide, too high, too many bytes
    Image.new("L", (16, 16), 128).save(data / "train" / "dog" / "gray.png")  # mode L
    project = make_project(tmp / "proj", data, {
        "data.val_fraction": 0.0,  # keep both copies of the duplicate in train
        "validate.labels": ["cat", "dog", "fish"],  # fish: no images; bird: unknown label
        "validate.allowed_modes": ["RGB"],
        "validate.max_width": 64, "validate.max_height": 64,
        "validate.max_bytes": 5000,
        "validate.max_duplicate_rate": 0.0,
        "validate.max_imbalance_ratio": 2.0,
    })
    with pytest.raises(ValidationFailed) as err:
        _validate(project)
    layout = Layout.at(project)
    summary = json.loads(layout.validation.read_text())
    return {"error": str(err.value), "summary": summary, "layout": layout,
            "failed": {r["description"]: r for r in summary["expectations"] if not r["success"]}}


HARD = [
    ("every image carries a known label (validate.labels)", "test/bird/000.png"),
    ("image width within 8..64 px", "train/cat/big.png"),
    ("image height within 8..64 px", "train/cat/big.png"),
    ("image modes in ['RGB']", "train/dog/gray.png"),
    ("file size at most 5000 bytes", "train/cat/big.png"),
    ("duplicates within a split at most 0.00%", "train/cat/dup.png"),
    ("at least 5 training images per class", "bird"),
    ("every val/test class also appears in train", "bird"),
    ("largest/smallest class ratio at most 2.0", "cat (7)"),  # 5 + dup + big
]


@pytest.mark.parametrize(("description", "example"), HARD, ids=[h[0][:30] for h in HARD])
def test_hard_violation_fails_with_expectation_named(violations, description, example):
    r = violations["failed"][description]
    assert r["kind"] == "hard" and r["expectation"].startswith("expect_")
    if example:
        assert example in r["examples"]
    assert description in violations["summary"]["hard_failures"]


def test_hard_failures_make_one_line_error(violations):
    msg = violations["error"]
    assert "\n" not in msg and msg.startswith("data gate failed: hard expectation failed: ")
    assert "quarantine budget exceeded" not in msg  # every file is usable
    assert "(+6 more)" in msg  # 9 failures: three named, the rest counted
    assert violations["summary"]["quarantine"]["files"] == 0


def test_every_expectation_has_a_plain_description(violations):
    results = violations["summary"]["expectations"]
    assert len(results) == 12
    assert all(r["description"] and len(r["description"].split()) >= 4 for r in results)
    assert {r["kind"] for r in results} == {"hard", "budget"}


def test_leakage_expectation_fails_on_a_shared_file(caplog):
    """Leaked files are quarantined by the manifest, so the stage never shows this one
    failing; the suite still checks it on what reaches training. GX's INFO line about its
    temporary docs folder is not shown."""
    caplog.set_level(logging.INFO)
    images = pd.DataFrame({
        "path": ["train/a/1.png", "test/a/1.png"], "split": ["train", "test"],
        "label": ["a", "a"], "width": [16, 16], "height": [16, 16], "mode": ["RGB", "RGB"],
        "bytes": [100, 100], "splits_sharing_file": [2, 2], "duplicate_in_split": [False, False],
    })
    params = load_params_raw()
    checks = [c for c in expectations.build_checks(params, ["a"]) if c.table == "images"]
    results = expectations.run_gx(checks, {"images": images}, None)
    failed = [r for r in results if not r["success"]]
    assert [r["description"] for r in failed] == ["no file (by sha256) appears in two splits"]
    assert failed[0]["examples"] == ["train/a/1.png", "test/a/1.png"]
    assert not [r for r in caplog.records if "ephemeral docs" in r.getMessage()]


def load_params_raw():
    from visionflow.core.configfile import parse_params

    return parse_params({})


def test_data_docs_are_built(violations):
    docs = violations["layout"].data_docs
    assert (docs / "index.html").is_file()
    pages = [p.read_text() for p in docs.rglob("*.html")]
    assert any("at least 5 training images per class" in p for p in pages)
    assert any("visionflow_images" in p for p in pages)


def test_console_table_lists_expectations_and_examples(violations):
    out = io.StringIO()
    validate.print_report(violations["summary"], file=out)
    text = out.getvalue()
    for word in ("expectation", "observed", "result", "examples", "FAIL", "pass",
                 "train/cat/big.png", "image modes in"):
        assert word in text


def test_validate_prints_the_table(tmp_path, capsys):
    data = write_imagefolder(tmp_path / "src", BASE)
    _validate(make_project(tmp_path / "proj", data))
    err = capsys.readouterr().err
    assert "data gate: data (16 files, 16 usable)" in err and "at least 5 training" in err


# ---------------------------------------------------------------------------
# row cache: unchanged rows are reused; any change is seen; a broken cache is harmless


@pytest.fixture
def cached(tmp_path):
    data = write_imagefolder(tmp_path / "src", BASE)
    project = make_project(tmp_path / "proj", data)
    _age(project / "data")
    layout = Layout.at(project)
    return layout, load_params(layout.params)


def test_row_cache_reuses_unchanged_and_sees_changes(cached):
    layout, params = cached
    found = survey_dataset(params, layout)
    root, rows, stats = found.root, found.rows, found.stats
    assert (stats.status, stats.decoded, stats.reused) == ("new", 16, 0)
    assert row_cache_file(layout, root).is_file()
    found = survey_dataset(params, layout)
    rows2, stats = found.rows, found.stats
    assert (stats.status, stats.reused, stats.decoded) == ("loaded", 16, 0)
    assert rows2 == rows

    cat = layout.root / "data" / "train" / "cat"
    Image.new("RGB", (16, 16), (9, 9, 9)).save(cat / "001.png")  # new content, same name
    os.utime(cat / "002.png")  # touched: same bytes, new mtime
    (cat / "003.png").unlink()
    shutil.copy(cat / "004.png", cat / "copy.png")  # a new file with known content
    found = survey_dataset(params, layout)
    rows3, stats = found.rows, found.stats
    assert (stats.reused, stats.rehashed, stats.decoded) == (13, 2, 1)
    by_path = {r["path"]: r for r in rows3}
    assert "train/cat/003.png" not in by_path
    assert by_path["train/cat/001.png"]["mean"].startswith("0.0353")  # re-decoded: 9/255
    assert by_path["train/cat/copy.png"]["sha256"] == by_path["train/cat/004.png"]["sha256"]
    fresh = survey_dataset(load_params(layout.params, ["validate.cache=false"]), layout).rows
    assert data_hash(fresh) == data_hash(rows3)


def test_row_cache_corrupt_or_foreign_is_ignored(cached):
    layout, params = cached
    found = survey_dataset(params, layout)
    root, rows = found.root, found.rows
    path = row_cache_file(layout, root)
    for garbage in (b"{not json", b'{"signature": 1}', b"\x00" * 100,
                    json.dumps({"signature": json.loads(path.read_text())["signature"],
                                "columns": ["x"], "entries": {}}).encode()):
        path.write_bytes(garbage)
        found = survey_dataset(params, layout)
        again, stats = found.rows, found.stats
        assert stats.status.startswith("discarded") and stats.decoded == 16
        assert again == rows
    small = load_params(layout.params, ["validate.min_width=20"])  # a row check, not decode
    found = survey_dataset(small, layout)
    rows_small, stats = found.rows, found.stats
    assert (stats.status, stats.reused) == ("loaded", 16)
    assert {r["quarantine_reason"] for r in rows_small} == {"too_small"}
    gray = load_params(layout.params, ["data.channels=1"])  # other decode settings
    assert survey_dataset(gray, layout).stats.status == "discarded (made with other settings)"


def test_suite_memo_survives_removed_outputs(cached):
    layout, params = cached
    first = run_stage("validate", params, layout)
    assert first.summary["cache"]["suite"] == "miss"
    shutil.rmtree(layout.outputs)  # what `dvc repro` does before re-running a stage
    second = run_stage("validate", params, layout)
    assert second.summary["cache"]["suite"] == "hit"
    assert second.summary["cache"]["reused"] == 16
    assert (layout.data_docs / "index.html").is_file()
    assert second.summary["expectations"] == first.summary["expectations"]
    third = run_stage("validate", load_params(layout.params, ["validate.min_images_per_class=2"]),
                      layout)
    assert third.summary["cache"]["suite"] == "miss"


def test_failed_run_leaves_no_stale_success(cached, tmp_path):
    layout, params = cached
    run_stage("validate", params, layout)
    assert json.loads(layout.validation.read_text())["success"] is True
    (tmp_path / "broken.tar.gz").write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    bad = load_params(layout.params, [f"data.source={tmp_path / 'broken.tar.gz'}"])
    with pytest.raises(Exception, match="broken.tar.gz"):
        run_stage("validate", bad, layout)
    assert json.loads(layout.validation.read_text())["success"] is False


def test_archive_source_is_decoded_while_extracting(tmp_path):
    import tarfile

    data = write_imagefolder(tmp_path / "src" / "wrap", BASE)
    archive = tmp_path / "d.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(data, arcname="wrap")  # a wrapper folder: the dataset root is one level down
    layout = Layout.at(make_project(tmp_path / "proj", archive))
    found = survey_dataset(load_params(layout.params), layout)
    rows, stats = found.rows, found.stats
    assert (stats.decoded, stats.while_extracting, stats.reused) == (16, 16, 0)
    found = survey_dataset(load_params(layout.params), layout)
    again, stats = found.rows, found.stats
    assert stats.decoded == 0 and again == rows
    plain = survey_dataset(load_params(layout.params, ["validate.cache=false"]), layout).rows
    assert plain == rows  # the same rows as decoding the extracted files
