"""The data gate's defect catalogue, driven through the validate *stage*.

Every file-level defect, each archive attack, an empty class folder, a test class missing
from train and bad params: each gives its named reason code in quarantine.csv or its
one-line error, and no input file is changed, deleted or written outside the target.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
from builders import BASE, catalogue_files, evil_tar, evil_zip, snapshot, write_imagefolder
from helpers import BIN, make_project, run
from PIL import Image

from visionflow.core.configfile import load_params
from visionflow.core.errors import ConfigError, DataError, ValidationFailed
from visionflow.core.layout import Layout
from visionflow.orchestration.stage_runner import run_stage


def _validate(root: Path, overrides: list[str] | None = None):
    layout = Layout.at(root)
    return run_stage("validate", load_params(layout.params, overrides or []), layout), layout


def _quarantine(layout: Layout) -> dict[str, tuple[str, str]]:
    with layout.quarantine.open(newline="") as f:
        return {r["path"]: (r["reason"], r["detail"]) for r in csv.DictReader(f)}


def _outside_project(tmp: Path, project: Path) -> dict:
    """Snapshot of everything except what validate may write (outputs/, .cache/)."""
    snap = snapshot(tmp)
    skip = [f"{project.relative_to(tmp).as_posix()}/{d}" for d in ("outputs", ".cache")]
    return {k: v for k, v in snap.items() if not any(k == s or k.startswith(s + "/")
                                                     for s in skip)}


# ---------------------------------------------------------------------------
# file-level defects: one project holding all of them, one validate run

FILE_DEFECTS = {
    # catalogue file -> reason code (the file is placed in train/cat/)
    "zero.jpg": "zero_byte",
    "text.jpg": "not_an_image",
    "random.png": "not_an_image",
    "ok.ppm": "not_an_image",  # decodable by Pillow, but not an accepted format
    "truncated.jpg": "truncated",
    "truncated_header.jpg": "truncated",
    "truncated.png": "truncated",
    "broken_stream.png": "undecodable",
    "bomb.png": "decompression_bomb",
    "small.png": "too_small",
}
OTHER_DEFECTS = {
    # relpath in the dataset -> reason code
    "test/dog/leak.png": "cross_split_duplicate",
    "train/cat/link_out.png": "outside_root",
    "train/dog/dangling.png": "broken_link",
    "stray.png": "no_class",  # an image outside any class folder (a README is ignored)
    "train/dog/pipe.png": "not_a_file",
}


@pytest.fixture(scope="module")
def defects(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("defects")
    data = write_imagefolder(tmp / "src", BASE)
    project = make_project(tmp / "proj", data)
    root = project / "data"
    cat = catalogue_files(tmp / "catalogue")
    for name in FILE_DEFECTS:
        shutil.copy(cat[name], root / "train" / "cat" / name)
    shutil.copy(root / "train" / "dog" / "000.png", root / "test" / "dog" / "leak.png")
    (tmp / "outside").mkdir()
    (tmp / "outside" / "secret.png").write_bytes((root / "train/cat/000.png").read_bytes())
    (root / "train" / "cat" / "link_out.png").symlink_to(tmp / "outside" / "secret.png")
    (root / "train" / "dog" / "dangling.png").symlink_to(root / "train" / "dog" / "gone.png")
    (root / "README.txt").write_text("not an image, not in a class folder\n")
    Image.new("RGB", (16, 16), (7, 77, 177)).save(root / "stray.png")
    os.mkfifo(root / "train" / "dog" / "pipe.png")
    before = _outside_project(tmp, project)
    with pytest.raises(ValidationFailed) as err:
        _validate(project)
    return {"tmp": tmp, "project": project, "layout": Layout.at(project), "error": str(err.value),
            "before": before, "after": _outside_project(tmp, project)}


@pytest.mark.parametrize(("name", "reason"), sorted(FILE_DEFECTS.items()))
def test_file_defect_is_quarantined_with_its_reason(defects, name, reason):
    q = _quarantine(defects["layout"])
    assert q[f"train/cat/{name}"][0] == reason
    assert (defects["project"] / "data" / "train" / "cat" / name).exists()  # never deleted


@pytest.mark.parametrize(("rel", "reason"), sorted(OTHER_DEFECTS.items()))
def test_other_defect_is_quarantined_with_its_reason(defects, rel, reason):
    assert _quarantine(defects["layout"])[rel][0] == reason


def test_defects_fail_the_budget_in_one_line_and_touch_nothing(defects):
    msg = defects["error"]
    assert "\n" not in msg
    assert msg.startswith("data gate failed: quarantine budget exceeded:")
    assert "validate.max_quarantine_fraction=0.0" in msg
    assert "hard expectation failed" not in msg  # only unusable files: the budget speaks
    assert "zero_byte: train/cat/zero.jpg" in msg
    assert defects["after"] == defects["before"]  # inputs untouched, nothing written outside
    summary = json.loads(defects["layout"].validation.read_text())
    assert summary["success"] is False and summary["quarantine"]["exceeded"] is True
    assert summary["quarantine"]["files"] == len(FILE_DEFECTS) + len(OTHER_DEFECTS)
    assert summary["ignored"] == ["README.txt"]  # no image: listed, not quarantined
    assert summary["usable"] == sum(BASE.values())


def test_defects_within_the_budget_pass_and_stay_out_of_training(defects):
    result, layout = _validate(defects["project"], ["validate.max_quarantine_fraction=0.9"])
    assert result.success
    from visionflow.data.manifest import read_manifest, usable_rows

    _, rows = read_manifest(layout)
    usable = {r["path"] for r in usable_rows(rows)}
    assert not usable & {f"train/cat/{n}" for n in FILE_DEFECTS}
    assert not usable & set(OTHER_DEFECTS)
    assert len(usable) == sum(BASE.values())


# ---------------------------------------------------------------------------
# archive attacks: the stage stops with one line naming the member; nothing written


ATTACKS = [
    (".tar.gz", "absolute"), (".tar.gz", "dotdot"), (".tar.gz", "symlink"),
    (".tar.gz", "symlink_abs"), (".tar.gz", "hardlink"), (".tar.gz", "fifo"),
    (".tar.gz", "device"), (".zip", "dotdot"), (".zip", "absolute"),
]


@pytest.mark.parametrize(("suffix", "kind"), ATTACKS, ids=[f"{s[1:]}-{k}" for s, k in ATTACKS])
def test_archive_attack_stops_validate(tmp_path, suffix, kind):
    archive = tmp_path / "in" / f"evil{suffix}"
    archive.parent.mkdir()
    member = (evil_tar if suffix == ".tar.gz" else evil_zip)(kind)(archive)
    data = write_imagefolder(tmp_path / "src", {"cat": 2})
    project = make_project(tmp_path / "proj", data, {"data.source": str(archive)})
    before = _outside_project(tmp_path, project)
    before_tmp = set(os.listdir("/tmp"))
    with pytest.raises(DataError) as err:
        _validate(project)
    msg = str(err.value)
    assert member in msg and "evil" in msg and "\n" not in msg
    assert _outside_project(tmp_path, project) == before
    extracted = project / ".cache" / "extracted"
    assert not extracted.exists() or not any(extracted.iterdir())  # temp dir removed
    assert not (set(os.listdir("/tmp")) - before_tmp) & {"visionflow-evil-abs.txt", "evil.txt"}
    summary = json.loads(Layout.at(project).validation.read_text())
    assert summary["success"] is False and member in summary["error"]


# ---------------------------------------------------------------------------
# dataset-level defects


def test_empty_class_folder_fails_naming_the_class(tmp_path):
    data = write_imagefolder(tmp_path / "src", BASE)
    (data / "train" / "bird").mkdir()
    project = make_project(tmp_path / "proj", data)
    with pytest.raises(ValidationFailed) as err:
        _validate(project)
    msg = str(err.value)
    assert "\n" not in msg and "hard expectation failed" in msg
    assert "at least 5 training images per class: observed 0 e.g. bird" in msg
    summary = json.loads(Layout.at(project).validation.read_text())
    assert summary["empty_classes"] == ["bird"]


def test_test_class_missing_from_train_fails_naming_it(tmp_path):
    data = write_imagefolder(tmp_path / "src", {**BASE, "test/fox": 2})
    project = make_project(tmp_path / "proj", data)
    with pytest.raises(ValidationFailed) as err:
        _validate(project)
    msg = str(err.value)
    assert "\n" not in msg
    assert "every val/test class also appears in train" in msg and "fox" in msg


# ---------------------------------------------------------------------------
# bad params: one line naming the key and the value, before any work


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("validate.min_width=0", "validate.min_width=0"),
        ("validate.max_width=4", "validate.max_width=4: must be >= validate.min_width (8)"),
        ("validate.drift=maybe", "validate.drift='maybe'"),
        ("validate.max_quarantine_fraction=1.5", "validate.max_quarantine_fraction=1.5"),
        ("validate.allowed_modes=[RGB, XYZ]", "unknown image mode(s) ['XYZ']"),
        ("validate.labels=[]", "validate.labels=[]"),
        ("validate.drift_class_psi=-1", "validate.drift_class_psi=-1"),
        ("data.test_fraction=0.95", "data.val_fraction + data.test_fraction must be < 1"),
        ("validate.colour=1", "unknown key 'validate.colour'"),
    ],
)
def test_bad_params_one_line(tmp_path, override, expected):
    data = write_imagefolder(tmp_path / "src", {"cat": 1})
    project = make_project(tmp_path / "proj", data)
    with pytest.raises(ConfigError) as err:
        load_params(project / "params.yaml", [override])
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_bad_params_via_cli_write_nothing(tmp_path):
    data = write_imagefolder(tmp_path / "src", {"cat": 1})
    project = make_project(tmp_path / "proj", data)
    proc = run([str(BIN / "vflow"), "stage", "validate", "-s", "validate.max_width=4"],
               project, check=False)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "validate.max_width=4" in lines[0], proc.stderr
    assert not (project / "outputs").exists() and not (project / ".cache").exists()
