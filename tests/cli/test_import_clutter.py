"""`vflow data add` of a folder as people download it: `train/` and `val/` next to clutter
without images (IDE folders, `__pycache__/`, logs, scripts, a README). The clutter is left
out with a note listing it, the data trains; a folder with images that is not a split is
an error naming the user's own path."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import BIN, make_project

from visionflow.core.configfile import load_params
from visionflow.core.layout import Layout
from visionflow.orchestration.stage_runner import run_stage

pytestmark = pytest.mark.slow

VFLOW = str(BIN / "vflow")
CLUTTER = {
    ".idea/workspace.xml": "<project/>",
    ".vscode/settings.json": "{}",
    "__pycache__/prepare.cpython-311.pyc": "\x00\x01compiled",
    "logs/train.log": "epoch 1 loss 0.3\n",
    "logs/events/run-1.txt": "nothing here\n",
    "prepare.py": "print('split the data')\n",
    "download.sh": "#!/bin/sh\ncurl ...\n",
    "README.md": "# my dataset\n",
}
IGNORED = [".idea/", ".vscode/", "README.md", "__pycache__/", "download.sh", "logs/",
           "prepare.py"]


def _downloaded(dst: Path, digits_dir: Path, per_class: int = 30) -> Path:
    """`dst/` with train/ and val/ (digits) next to the clutter."""
    for split, n in (("train", per_class), ("val", per_class // 3)):
        for label_dir in sorted((digits_dir / split).iterdir()):
            out = dst / split / label_dir.name
            out.mkdir(parents=True)
            for f in sorted(label_dir.iterdir())[:n]:
                shutil.copy(f, out / f.name)
    for rel, text in CLUTTER.items():
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        (dst / rel).write_text(text)
    return dst


def _add(root: Path, folder: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([VFLOW, "data", "add", str(folder), "--root", str(root), *extra],
                          capture_output=True, text=True, timeout=300)


def test_add_a_downloaded_folder_and_train_on_it(tmp_path: Path, digits_dir: Path):
    folder = _downloaded(tmp_path / "Downloads" / "digits-mini", digits_dir)
    root = make_project(tmp_path / "proj", digits_dir,
                        {"train.epochs": 1, "train.threads": 1, "compress.methods": []})
    shutil.rmtree(root / "data")  # a project without data yet

    added = _add(root, folder)
    assert added.returncode == 0, added.stdout + added.stderr
    assert f"ignored (no images): {', '.join(IGNORED)}" in added.stdout
    assert sorted(p.name for p in (root / "data").iterdir()) == ["train", "val"]
    assert (root / "data.dvc").is_file()
    assert (folder / "logs" / "train.log").is_file()  # the source is only read

    layout = Layout.at(root)
    params = load_params(layout.params)
    for stage in ("validate", "pack", "train"):
        run_stage(stage, params, layout)
    summary = json.loads(layout.validation.read_text())
    assert summary["success"] and summary["ignored"] == []  # nothing left to ignore in data/
    assert set(summary["counts"]) == {"train", "val", "test"}  # test carved from train
    assert summary["split_scheme"]["carved"] == ["test"]
    assert sum(summary["counts"]["val"].values()) == 10 * 10  # the folder's own val/ kept
    assert layout.model.is_file() and json.loads(layout.run_info.read_text())["run_id"]


def test_a_folder_with_images_that_is_not_a_split_names_the_users_path(tmp_path: Path,
                                                                      digits_dir: Path):
    folder = _downloaded(tmp_path / "Downloads" / "digits-mini", digits_dir, per_class=6)
    stray = folder / "extra" / "7"
    stray.mkdir(parents=True)
    shutil.copy(next((digits_dir / "test" / "7").iterdir()), stray / "x.png")
    root = make_project(tmp_path / "proj", digits_dir)
    before = sorted(p.relative_to(root).as_posix() for p in (root / "data").rglob("*"))

    added = _add(root, folder, "--force")  # even forced: nothing is replaced
    assert added.returncode != 0
    lines = [line for line in added.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {folder}: "), added.stderr
    assert "extra/" in lines[0] and "logs" not in lines[0]
    assert ".data.new-" not in lines[0] and ".import-" not in lines[0]
    assert sorted(p.relative_to(root).as_posix() for p in (root / "data").rglob("*")) == before
    assert not [p for p in root.iterdir() if p.name.startswith(".data.")]


def test_archive_limits_from_params_stop_data_add_and_validate(tmp_path: Path,
                                                               digits_dir: Path):
    import tarfile

    from visionflow.core.errors import DataError

    folder = _downloaded(tmp_path / "dl" / "mini", digits_dir, per_class=3)
    archive = tmp_path / "mini.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="mini")
    root = make_project(tmp_path / "proj", digits_dir, {"data.max_archive_members": 20})
    before = sorted(p.relative_to(root).as_posix() for p in (root / "data").rglob("*"))

    added = _add(root, archive, "--force")  # `vflow data add` reads the limit from params
    lines = [line for line in added.stderr.splitlines() if line.strip()]
    assert added.returncode == 3 and len(lines) == 1, added.stderr
    assert str(archive) in lines[0] and "data.max_archive_members=20" in lines[0]
    assert sorted(p.relative_to(root).as_posix() for p in (root / "data").rglob("*")) == before
    assert not [p for p in root.iterdir() if p.name.startswith(".data.")]

    layout = Layout.at(root)  # the validate stage reads an archive source under the same cap
    params = load_params(layout.params, [f"data.source={archive}", "data.max_archive_bytes=1000",
                                         "data.max_archive_members=5000000"])
    with pytest.raises(DataError, match=r"exceeds data\.max_archive_bytes=1000 "):
        run_stage("validate", params, layout)
    assert not layout.extract_cache.exists() or not any(layout.extract_cache.iterdir())
    assert json.loads(layout.validation.read_text())["success"] is False
