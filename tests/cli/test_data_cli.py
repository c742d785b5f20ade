"""`vflow data add` / `vflow data status` and the default DVC remote, in a temporary
git+DVC repository."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest
from builders import evil_tar, snapshot, write_imagefolder, write_mnist_raw
from helpers import BIN, make_project, run
from seg_projects import write_voc

from visionflow.core.layout import Layout
from visionflow.data.dvc import dvc_out
from visionflow.data.segmentation_layout import scan_segmentation

VFLOW, DVC = str(BIN / "vflow"), str(BIN / "dvc")


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _md5(root: Path) -> str:
    return str(dvc_out(root / "data.dvc").get("md5", ""))


def _one_error_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("datacli")
    v1 = write_imagefolder(tmp / "v1", {"train/cat": 6, "train/dog": 6, "test/cat": 2,
                                        "test/dog": 2})
    root = make_project(tmp / "proj", v1, git=True, mlflow_store=False)
    ignore = root / ".gitignore"  # `data add` must add the default remote's folder itself
    ignore.write_text("".join(line for line in ignore.read_text().splitlines(keepends=True)
                              if line.strip() != "/.dvc-storage/"))
    return tmp, root


def test_add_folder_then_push_and_pull(repo):
    tmp, root = repo
    v2 = write_imagefolder(tmp / "v2", {"cat": 9, "dog": 8, "fox": 7})
    before_src, before_md5 = snapshot(v2), _md5(root)
    proc = run([VFLOW, "data", "add", str(v2)], root)
    assert "imported 24 images" in proc.stdout and "dvc push" in proc.stdout
    assert _md5(root) not in ("", before_md5)  # data.dvc records the new version
    assert _files(root / "data") == _files(v2)
    assert snapshot(v2) == before_src  # the source is only read
    assert "data.dvc" in run(["git", "status", "--porcelain"], root).stdout
    assert not [p for p in root.iterdir() if p.name.startswith(".data.")]  # no staging left

    # the default remote: configured by `data add`, git-ignored, push/pull work
    assert "local" in run([DVC, "remote", "default"], root).stdout
    assert "/.dvc-storage/" in (root / ".gitignore").read_text().splitlines()
    run([DVC, "push", "-q", "data.dvc"], root)
    assert any((root / ".dvc-storage").rglob("*"))
    shutil.rmtree(root / "data")
    shutil.rmtree(root / ".dvc" / "cache")
    run([DVC, "pull", "-q", "data.dvc"], root)
    assert _files(root / "data") == _files(v2)


def test_add_archive_and_the_refusals(repo):
    tmp, root = repo
    v3 = write_imagefolder(tmp / "v3" / "mydata", {"train/cat": 5, "train/dog": 5,
                                                  "test/cat": 1, "test/dog": 1})
    archive = tmp / "v3.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(v3, arcname="mydata")  # a wrapper folder: unwrapped on import
    before = _md5(root)
    run([VFLOW, "data", "add", str(archive), "--push"], root)
    assert _md5(root) != before and _files(root / "data") == _files(v3)
    assert run([DVC, "status", "-c", "-q", "data.dvc"], root, check=False).returncode == 0

    # local changes not recorded in data.dvc are never thrown away without --force
    (root / "data" / "train" / "cat" / "mine.png").write_bytes(
        (v3 / "train" / "cat" / "000.png").read_bytes())
    proc = run([VFLOW, "data", "add", str(tmp / "v1")], root, check=False)
    assert proc.returncode == 3
    assert "has changes not recorded in data.dvc" in _one_error_line(proc)
    assert (root / "data" / "train" / "cat" / "mine.png").is_file()

    # an archive attack: one line naming the member, data/ untouched, nothing left behind
    evil = tmp / "evil.tar.gz"
    member = evil_tar("dotdot")(evil)
    run([DVC, "add", "-q", "data"], root)  # record the local change first
    snap, md5 = snapshot(root / "data"), _md5(root)
    proc = run([VFLOW, "data", "add", str(evil)], root, check=False)
    assert proc.returncode == 3 and member in _one_error_line(proc)
    assert snapshot(root / "data") == snap and _md5(root) == md5
    assert not [p for p in root.iterdir() if p.name.startswith(".data.")]

    # no images / no such path / the target itself: refused, nothing changed
    (tmp / "empty" / "cat").mkdir(parents=True)
    (tmp / "empty" / "cat" / "notes.txt").write_text("no images here")
    for bad, words in ((tmp / "empty", "no images in class folders"),
                       (tmp / "missing", "no such file or directory"),
                       (root / "data" / "train", "overlaps the target")):
        proc = run([VFLOW, "data", "add", str(bad)], root, check=False)
        assert proc.returncode == 3 and words in _one_error_line(proc), proc.stderr
    assert snapshot(root / "data") == snap and _md5(root) == md5

    # a torchvision dataset (its raw files already downloaded): written out once, then added
    write_mnist_raw(root / ".cache" / "torchvision" / "MNIST" / "raw")
    proc = run([VFLOW, "data", "add", "torchvision:MNIST", "--force"], root)
    assert "imported 80 images" in proc.stdout and _md5(root) != md5
    assert len(list((root / "data" / "train").iterdir())) == 10

    run([VFLOW, "data", "add", str(tmp / "v1"), "--force"], root)
    assert _files(root / "data") == _files(tmp / "v1")


def test_status_next_to_the_champion(repo):
    tmp, root = repo
    out = json.loads(run([VFLOW, "data", "status", "--json"], root).stdout)
    cur = out["current"]
    assert cur["dvc_data_md5"] == _md5(root) and cur["workspace"] == "in sync"
    assert len(cur["data_hash"]) == 32
    assert out["champion"]["status"] == "no registry" and out["same_as_champion"] is None
    assert out["remote"]["name"] == "local" and out["remote"]["url"].endswith(".dvc-storage")

    _register(Layout.at(root), cur["data_hash"], cur["dvc_data_md5"])
    table = run([VFLOW, "data", "status"], root).stdout
    assert "visionflow-classifier v1 @champion" in table and cur["data_hash"] in table
    assert "same data as the champion" in table

    (root / "data" / "train" / "dog" / "000.png").unlink()
    out = json.loads(run([VFLOW, "data", "status", "--json"], root).stdout)
    assert out["current"]["workspace"] == "modified" and out["same_as_champion"] is False
    assert out["champion"]["version"] == "1" and out["champion"]["dvc_data_md5"] == _md5(root)


def _register(layout: Layout, data_hash: str, md5: str) -> None:
    import mlflow
    from mlflow import MlflowClient

    from visionflow.mlops import tracking

    tracking.setup(layout)
    with mlflow.start_run() as r:
        pass
    client = MlflowClient()
    client.create_registered_model("visionflow-classifier")
    mv = client.create_model_version("visionflow-classifier", f"runs:/{r.info.run_id}/model",
                                     run_id=r.info.run_id,
                                     tags={"data_hash": data_hash, "dvc_data_md5": md5})
    client.set_registered_model_alias("visionflow-classifier", "champion", mv.version)


def test_merge_adds_to_the_current_version_and_says_what_a_replace_drops(tmp_path: Path):
    v1 = write_imagefolder(tmp_path / "v1", {"train/cat": 4, "train/dog": 4, "test/cat": 2,
                                             "test/dog": 2})
    root = make_project(tmp_path / "proj", v1, git=True, mlflow_store=False)
    # train/cat/000-002 are v1's own bytes (pixels follow the path): kept once, not refused
    new = write_imagefolder(tmp_path / "new", {"train/cat": 3, "train/fox": 2})
    proc = run([VFLOW, "data", "add", str(new), "--merge"], root)
    assert "12 files before, 14 now" in proc.stdout, proc.stdout
    assert _files(root / "data") == {**_files(v1), **_files(new)}
    assert dvc_out(root / "data.dvc")["nfiles"] == 14

    snap, md5 = snapshot(root / "data"), _md5(root)
    clash = write_imagefolder(tmp_path / "clash", {"train/dog": 1})
    (clash / "train" / "dog" / "000.png").write_bytes((new / "train/fox/000.png").read_bytes())
    flat = write_imagefolder(tmp_path / "flat", {"cat": 2})
    for bad, words in ((clash, "train/dog/000.png is also in data/ with other bytes"),
                       (flat, "is laid out as <class>/ but data/ as train/<class>/")):
        proc = run([VFLOW, "data", "add", str(bad), "--merge"], root, check=False)
        assert proc.returncode == 3 and words in _one_error_line(proc), proc.stderr
        assert snapshot(root / "data") == snap and _md5(root) == md5

    proc = run([VFLOW, "data", "add", str(flat)], root)  # without --merge: a new version
    assert "in place of the 14 files before (--merge adds to them)" in proc.stdout, proc.stdout
    assert _files(root / "data") == _files(flat)

    seg = write_imagefolder(tmp_path / "seg", {"images": 3, "masks": 3})  # a segmentation set
    proc = run([VFLOW, "data", "add", str(seg)], root)  # its masks are not counted as images
    assert "imported 3 images and 3 masks (6 files)" in proc.stdout, proc.stdout


def test_merge_of_two_voc_trees_joins_their_split_lists(tmp_path: Path):
    """A VOC tree names its pairs in ImageSets/Segmentation/*.txt, a file both versions have:
    --merge joins the lists (a pair a current list names keeps its split) where it refused
    the file; the source is only read."""
    v1 = write_voc(tmp_path / "v1", n=8, bad=0)  # train 0-5, val 6-7
    root = make_project(tmp_path / "proj", v1, {"task": "segmentation"}, git=True,
                        mlflow_store=False)
    more = write_voc(tmp_path / "more", n=8, bad=0, first=6)  # train 6-11, val 12-13
    source = snapshot(more)
    run([VFLOW, "data", "add", str(more), "--merge"], root)
    lists, stems = root / "data/ImageSets/Segmentation", [f"2007_{i:06d}" for i in range(14)]
    assert (lists / "train.txt").read_text().split() == stems[:6] + stems[8:12]
    assert (lists / "val.txt").read_text().split() == stems[6:8] + stems[12:]
    assert snapshot(more) == source
    scan = scan_segmentation(root / "data")
    assert sorted(p.stem for p in scan.pairs) == stems and not scan.quarantined


def test_a_nested_source_is_versioned_by_its_own_dvc_file(tmp_path: Path):
    """`data.source: data/pets`, tracked by `data/pets.dvc`: the version's lineage tag and
    `vflow data status` both read that file's md5 (a fixed `data.dvc` found none), and
    `vflow data add --to data/pets` replaces and pushes it."""
    from visionflow.core.configfile import load_params
    from visionflow.mlops.provenance import version_tags
    from visionflow.orchestration.stage_runner import run_stage
    from visionflow.orchestration.trigger import data_version

    src = write_imagefolder(tmp_path / "v1" / "pets", {"a": 14, "b": 14}).parent
    root = make_project(tmp_path / "proj", src, {"data.source": "data/pets"},
                        mlflow_store=False)
    run(["git", "init", "-q"], root)
    run([DVC, "init", "-q"], root)
    run([DVC, "add", "-q", "data/pets"], root)
    md5 = str(dvc_out(root / "data" / "pets.dvc")["md5"]).removesuffix(".dir")
    layout, params = Layout.at(root), load_params(root / "params.yaml")
    run_stage("validate", params, layout)  # it records the .dvc file register reads
    assert json.loads(layout.validation.read_text())["dvc_file"] == "data/pets.dvc"
    assert version_tags(params, layout)["lineage.dvc_data_md5"] == md5
    assert data_version(params, layout)["dvc_md5"] == md5
    # a new version of it, pushed: `dvc` is given the file's path from the root
    new = write_imagefolder(tmp_path / "v2", {"a": 4, "b": 4})
    out = run([VFLOW, "data", "add", str(new), "--to", "data/pets", "--push"], root).stdout
    assert "data/pets.dvc: md5 " in out and "(pushed to 'local')" in out, out
    assert "next: git add data/pets.dvc " in out, out
    status = json.loads(run([VFLOW, "data", "status", "--to", "data/pets", "--json",
                             "--no-hash"], root).stdout)
    assert status["current"]["workspace"] == "in sync" and status["current"]["nfiles"] == 8


def _version(tags: dict[str, str], dvc_text: str | None = None, child: bool = False) -> str:
    """A registered version of a bare run (with `dvc/data.dvc` when given; in a child run
    of that run, as `compact` is registered, with `child`) and `tags`."""
    import mlflow
    from mlflow import MlflowClient

    with mlflow.start_run() as r:
        if dvc_text is not None:
            mlflow.log_text(dvc_text, "dvc/data.dvc")
        if child:
            with mlflow.start_run(nested=True) as r:
                pass
    client, name = MlflowClient(), "visionflow-classifier"
    if not client.search_registered_models(f"name='{name}'"):
        client.create_registered_model(name)
    return client.create_model_version(name, f"runs:/{r.info.run_id}/model", r.info.run_id,
                                       tags=tags).version


def test_checkout_from_a_clean_commit_and_its_refusals(tmp_path: Path):
    """A version without the run's copy comes back from its (clean) commit; a version whose
    file is nowhere, data that cannot be fetched, local changes, an unknown version: one
    line each, and data/ and data.dvc stay as they were."""
    from visionflow.mlops import tracking

    root = make_project(tmp_path / "proj", write_imagefolder(tmp_path / "v1", {"a": 3, "b": 3}),
                        git=True)
    tracking.setup(Layout.at(root))
    head, md5 = run(["git", "rev-parse", "HEAD"], root).stdout.strip(), _md5(root)
    first = _files(root / "data")
    _version({"lineage.dvc_data_md5": md5.removesuffix(".dir"), "lineage.git_commit": head})
    run([VFLOW, "data", "add", str(write_imagefolder(tmp_path / "v2", {"a": 4}))], root)
    run(["git", "commit", "-qam", "data: v2"], root)
    out = run([VFLOW, "data", "checkout", "champion"], root, check=False)
    assert "no version has alias 'champion'" in _one_error_line(out)
    assert run([VFLOW, "data", "checkout", "1"], root).stdout.startswith(
        f"data/: the data visionflow-classifier v1 was trained on (data.dvc md5 "
        f"{md5.removesuffix('.dir')}, 6 files; data.dvc from commit {head[:12]})")
    assert _files(root / "data") == first and _md5(root) == md5

    before, dvc_before = _files(root / "data"), (root / "data.dvc").read_text()
    nowhere = dvc_before.replace(md5, "0" * 32 + ".dir")
    _version({"lineage.dvc_data_md5": "0" * 32, "lineage.git_commit": f"{head}-dirty"})
    _version({"lineage.dvc_data_md5": "0" * 32}, nowhere)
    _version({"lineage.dvc_data_md5": "1" * 32}, nowhere)
    for ref, says in (("2", "neither its run (no dvc/data.dvc) nor a clean git commit"),
                      ("3", "data checkout: data.dvc md5 " + "0" * 32 + ": not in the DVC "
                            "cache, nor on remote 'local'"),
                      ("4", "its run's dvc/data.dvc records md5 " + "0" * 32 + ".dir, not "
                            "the version's " + "1" * 32),
                      ("9", "version 9 not found (versions: 1, 2, 3, 4)")):
        line = _one_error_line(run([VFLOW, "data", "checkout", ref], root, check=False))
        assert says in line, (ref, line)
        assert _files(root / "data") == before
        assert (root / "data.dvc").read_text() == dvc_before
    _version({"lineage.dvc_data_md5": md5.removesuffix(".dir")}, dvc_before, child=True)
    assert "data.dvc from its parent run's dvc/data.dvc" in run(
        [VFLOW, "data", "checkout", "5"], root).stdout
    (root / "data" / "a" / "000.png").write_bytes(b"changed")
    line = _one_error_line(run([VFLOW, "data", "checkout", "1"], root, check=False))
    assert "data checkout: " in line and "has changes not recorded in data.dvc" in line


def test_one_import_or_checkout_of_a_folder_at_a_time(tmp_path: Path):
    """`vflow data add` and `data checkout` beside another change of the same folder (a
    scheduled refresh's sync) stop in one line; data/ and data.dvc stay as they were."""
    from visionflow.data.add import one_change_at_a_time
    from visionflow.mlops import tracking

    root = make_project(tmp_path / "proj", write_imagefolder(tmp_path / "v1", {"a": 3, "b": 3}),
                        git=True)
    tracking.setup(Layout.at(root))
    head, md5 = run(["git", "rev-parse", "HEAD"], root).stdout.strip(), _md5(root)
    _version({"lineage.dvc_data_md5": md5.removesuffix(".dir"), "lineage.git_commit": head})
    v2 = write_imagefolder(tmp_path / "v2", {"a": 4})
    before, dvc_before = _files(root / "data"), (root / "data.dvc").read_text()
    with one_change_at_a_time(Layout.at(root), "data", "a sync"):
        for args, cmd in (([str(v2)], "add"), (["1"], "checkout")):
            line = _one_error_line(run([VFLOW, "data", cmd, *args], root, check=False))
            assert line == (f"error: data {cmd}: another import, sync or checkout of data/ is "
                            "running"), line
            assert _files(root / "data") == before
            assert (root / "data.dvc").read_text() == dvc_before
    run([VFLOW, "data", "add", str(v2)], root)  # the lock is free again
    assert _files(root / "data") != before
    assert "data.dvc from commit" in run([VFLOW, "data", "checkout", "1"], root).stdout
    assert _files(root / "data") == before
