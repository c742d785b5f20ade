"""Content-addressed splits through the real survey (files on disk, the row cache): adding,
removing or renaming files never moves another file, identical bytes share a split, and a
changed split seed is reported as a new split against the champion (a real MLflow store)."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from builders import encode
from helpers import make_project
from PIL import Image

from visionflow.core.configfile import load_params
from visionflow.core.layout import Layout
from visionflow.data import splits
from visionflow.data.scan import FileEntry
from visionflow.data.survey import survey_dataset
from visionflow.orchestration.stage_runner import run_stage

CLASSES = ("cat", "dog", "fox")


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return encode(Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)), "PNG")


def _flat(root: Path, per_class: int, start: int = 0) -> Path:
    """`root/<class>/<i>.png`, distinct content per (class, i)."""
    for c, label in enumerate(CLASSES):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(start, start + per_class):
            (root / label / f"{i:04d}.png").write_bytes(_png(1000 * c + i))
    return root


def _splits(layout: Layout, overrides: list[str] | None = None) -> dict[str, str]:
    rows = survey_dataset(load_params(layout.params, overrides or []), layout).rows
    return {r["path"]: r["split"] for r in rows if not r["quarantine_reason"]}


def test_ten_percent_more_files_move_no_existing_file(tmp_path: Path):
    data = _flat(tmp_path / "src", 60)
    layout = Layout.at(make_project(tmp_path / "proj", data))
    before = _splits(layout)
    assert set(Counter(before.values())) == {"train", "val", "test"}

    root = layout.root / "data"
    _flat(root, 6, start=60)  # 10% more per class
    (root / "cat" / "0003.png").rename(root / "cat" / "renamed.png")
    gone = "dog/0007.png"
    (root / gone).unlink()
    shutil.copy(root / "fox" / "0005.png", root / "fox" / "copy-of-5.png")  # same bytes
    after = _splits(layout)

    moved = {p: (s, after[p]) for p, s in before.items() if p in after and after[p] != s}
    assert not moved, moved
    assert after["cat/renamed.png"] == before["cat/0003.png"]  # renaming keeps the split
    assert after["fox/copy-of-5.png"] == after["fox/0005.png"]  # identical bytes, one split
    assert gone not in after
    new = [p for p in after if p not in before]
    assert len(new) == 3 * 6 + 2 and {after[p] for p in new} <= {"train", "val", "test"}
    # each split is the band of the file's content position (nothing depends on neighbours)
    rows = survey_dataset(load_params(layout.params), layout).rows
    for r in rows:
        u = splits.split_position(r["sha256"], 0)
        assert r["split"] == ("test" if u < 0.2 else "val" if u < 0.3 else "train"), r


def test_limit_per_class_subset_is_stable(tmp_path: Path):
    data = _flat(tmp_path / "src", 40)
    layout = Layout.at(make_project(tmp_path / "proj", data, {"data.limit_per_class": 8}))
    before = _splits(layout)
    _flat(layout.root / "data", 4, start=40)
    after = _splits(layout)
    # a kept file keeps its split; per (split, class) at most one is displaced per new file
    assert all(after[p] == s for p, s in before.items() if p in after)
    assert len(set(before) - set(after)) <= 3 * 4
    assert max(Counter((s, p.split("/")[0]) for p, s in after.items()).values()) <= 8


def test_scheme_fingerprint():
    flat = [FileEntry("/d/a/1.png", "a/1.png", None, "a")]
    given = [FileEntry(f"/d/{s}/a/1.png", f"{s}/a/1.png", s, "a") for s in splits.SPLITS]
    base = splits.split_scheme(flat, 0.1, 0.2, 0)
    assert base["carved"] == ["val", "test"] and base["bands"] == {"test": [0, 0.2],
                                                                   "val": [0.2, 0.3]}
    assert splits.split_scheme(flat, 0.1, 0.2, 0) == base  # deterministic
    for other in (splits.split_scheme(flat, 0.1, 0.2, 1), splits.split_scheme(flat, 0.15, 0.2, 0),
                  splits.split_scheme(flat, 0.1, 0.25, 0)):
        assert other["fingerprint"] != base["fingerprint"]
        cmp = splits.compare_schemes(other, base, "champion v1")
        assert cmp["status"] == "new_split" and "NEW SPLIT" in cmp["message"]
    fixed = splits.split_scheme(given, 0.1, 0.2, 0)
    assert fixed["carved"] == [] and fixed == splits.split_scheme(given, 0.3, 0.3, 9)
    assert splits.compare_schemes(base, base, "champion v1")["status"] == "same"
    assert splits.compare_schemes(base, None, "no champion yet")["status"] == "no_reference"


@pytest.fixture
def champion_project(tmp_path: Path):
    """A project whose registry has a champion tagged with this project's split scheme."""
    from visionflow.mlops import registry

    data = _flat(tmp_path / "src", 10)
    layout = Layout.at(make_project(tmp_path / "proj", data,
                                    {"validate.min_images_per_class": 1}))
    scheme = survey_dataset(load_params(layout.params), layout).scheme
    client = registry.client_for(layout)
    client.create_registered_model("visionflow-classifier")
    client.create_model_version("visionflow-classifier", source=(tmp_path / "none").as_uri(),
                                tags={"split_scheme": json.dumps(scheme)})
    client.set_registered_model_alias("visionflow-classifier", "champion", "1")
    return layout, scheme


def test_a_new_split_is_reported_against_the_champion(champion_project, capsys):
    layout, scheme = champion_project
    same = run_stage("validate", load_params(layout.params), layout).summary
    assert same["split"]["status"] == "same" and same["split_scheme"] == scheme
    assert "same split as champion v1" in same["split"]["message"]
    capsys.readouterr()

    run_stage("validate", load_params(layout.params, ["data.split_seed=7"]), layout)
    report = json.loads(layout.validation.read_text())
    assert report["split"]["status"] == "new_split"
    assert report["split"]["reference"] == scheme["fingerprint"]
    assert "split_seed=7" in report["split"]["message"]
    printed = capsys.readouterr().err
    assert "NEW SPLIT" in printed and "split_seed=7" in printed
