"""Images kept in S3: `vflow data add s3://bucket/prefix` mirrors the prefix into data/ from a
real S3 server (rclone) and `dvc add`s it, `data.dvc` records the prefix, and the retrain
flow's data refresh syncs it again, downloading only what changed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from builders import snapshot, wait_for, write_imagefolder
from helpers import BIN, make_project, run
from s3_server import s3_server

from visionflow.core.configfile import load_params
from visionflow.core.errors import DataError
from visionflow.core.layout import Layout
from visionflow.data.dvc import dvc_md5, dvc_origin
from visionflow.data.s3_sync import safe_key
from visionflow.orchestration import trigger

VFLOW, DVC = str(BIN / "vflow"), str(BIN / "dvc")
URL = "s3://photos/pets"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with s3_server(tmp_path_factory.mktemp("s3"), ("photos",)) as server:
        yield server


@pytest.fixture
def proj(tmp_path: Path, s3, monkeypatch) -> tuple[Path, dict[str, str]]:
    for key, value in s3.env.items():  # the flow's tasks run DVC from this process
        monkeypatch.setenv(key, value)
    root = make_project(tmp_path / "proj", write_imagefolder(tmp_path / "v1", {"a": 3, "b": 3}),
                        git=True, mlflow_store=False)
    run([DVC, "config", "core.autostage", "true"], root)  # as this repo's
    run(["git", "commit", "-qam", "dvc: autostage"], root)
    return root, {**os.environ, **s3.env}


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _error(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_an_s3_prefix_is_imported_and_a_refresh_fetches_what_changed(proj, s3, tmp_path):
    root, env = proj
    pets = write_imagefolder(tmp_path / "pets", {"train/cat": 4, "train/dog": 4,
                                                 "test/cat": 2, "test/dog": 2})
    s3.upload(pets, "photos", "pets")
    out = run([VFLOW, "data", "add", URL], root, env=env).stdout
    assert f"imported 12 images (12 files) from {URL}" in out
    assert f"{URL}: 12 objects downloaded" in out
    assert "a scheduled retrain (--only-new-data) syncs it again" in out
    assert _contents(root / "data") == _contents(pets)
    assert dvc_origin(root / "data.dvc") == URL  # the import's origin, for `dvc update`
    status = json.loads(run([VFLOW, "data", "status", "--json", "--no-hash"], root,
                            env=env).stdout)
    assert status["current"]["imported_from"] == URL
    assert status["current"]["workspace"] == "in sync"
    run(["git", "commit", "-qam", "data: the S3 import"], root)

    # a photo added, one replaced, one deleted in the bucket: the retrain flow's refresh
    # downloads those two alone (the others stay the same files), data.dvc's md5 moves
    layout, params = Layout.at(root), load_params(root / "params.yaml")
    md5, data = dvc_md5(root / "data.dvc"), root / "data"
    inodes = {p: p.stat().st_ino for p in data.rglob("*.png")}
    s3c, new = s3.client(), (pets / "train" / "dog" / "000.png").read_bytes()
    s3c.put_object(Bucket="photos", Key="pets/train/dog/new.png", Body=new)
    s3c.put_object(Bucket="photos", Key="pets/train/cat/001.png", Body=new)
    s3c.delete_object(Bucket="photos", Key="pets/test/cat/000.png")
    assert trigger.refresh_data(params, layout) == (
        f"{URL}: 2 new or changed, 1 removed, 10 unchanged (data.dvc md5 "
        f"{dvc_md5(root / 'data.dvc')}.dir; pushed to remote 'local')")
    # pushed: the bucket can change again, and a model trained now must name a version
    # others can `dvc pull`
    assert "in sync" in run([DVC, "status", "--cloud", "data.dvc"], root).stdout
    assert (data / "train/dog/new.png").read_bytes() == new == \
        (data / "train/cat/001.png").read_bytes()
    assert not (data / "test/cat/000.png").exists()
    kept = {p: i for p, i in inodes.items() if p.exists() and p.stat().st_ino == i}
    assert len(kept) == 10 and data / "train/cat/001.png" not in kept  # not downloaded again
    assert dvc_md5(root / "data.dvc") not in ("", md5)
    assert run([DVC, "status", "data.dvc"], root).stdout.strip().endswith(
        "up to date.")
    assert trigger.data_version(params, layout)["dvc_md5"] == dvc_md5(root / "data.dvc")
    assert trigger.refresh_data(params, layout) == f"{URL}: unchanged (12 objects)"

    # files DVC links in from its cache (`cache.type symlink`) count as unchanged too
    run([DVC, "config", "cache.type", "symlink"], root)
    run([DVC, "checkout", "--relink", "-q", "data.dvc"], root)
    assert (data / "train/cat/000.png").is_symlink()
    s3c.put_object(Bucket="photos", Key="pets/train/cat/more.png", Body=new)
    assert trigger.refresh_data(params, layout).startswith(
        f"{URL}: 1 new or changed, 0 removed, 12 unchanged")

    # a push that fails is said, and the run goes on with the new version
    (tmp_path / "a-file").write_text("")
    run([DVC, "remote", "add", "-d", "-f", "broken", str(tmp_path / "a-file")], root)
    s3c.put_object(Bucket="photos", Key="pets/train/dog/more.png", Body=new)
    line = trigger.refresh_data(params, layout)
    assert line.startswith(f"{URL}: 1 new or changed, 0 removed, 13 unchanged"), line
    assert "; not pushed to remote 'broken': " in line and line.endswith(")"), line
    assert (data / "train/dog/more.png").read_bytes() == new


def test_refused_imports_leave_the_version_and_git_as_they_were(proj, s3, tmp_path):
    root, env = proj
    notes = tmp_path / "notes"
    (notes / "docs").mkdir(parents=True)
    (notes / "docs" / "readme.txt").write_text("no images here")
    s3.upload(notes, "photos", "notes")
    s3.upload(write_imagefolder(tmp_path / "ok", {"cat": 2, "dog": 2}), "photos", "ok")
    snap, dvc_file = snapshot(root / "data"), (root / "data.dvc").read_text()
    for url, words in (("s3://photos/notes", "no images in class folders"),
                       ("s3://photos/missing", "no objects under this prefix")):
        proc = run([VFLOW, "data", "add", url], root, check=False, env=env)
        assert proc.returncode == 3 and words in _error(proc), proc.stderr
        assert snapshot(root / "data") == snap and (root / "data.dvc").read_text() == dvc_file
        assert run(["git", "status", "--porcelain", "--", "data.dvc"], root).stdout == ""
    bad_key = {**env, "AWS_SECRET_ACCESS_KEY": "wrong"}
    proc = run([VFLOW, "data", "add", "s3://photos/ok"], root, check=False, env=bad_key)
    assert proc.returncode == 3 and "s3://photos/ok: PermissionError" in _error(proc)
    no_key = {k: v for k, v in env.items() if not k.startswith("AWS_ACCESS_KEY")}
    proc = run([VFLOW, "data", "add", "s3://photos/ok"], root, check=False,
               env={**no_key, "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
                    "AWS_CONFIG_FILE": str(tmp_path / "none")})
    assert proc.returncode == 3 and "NoCredentialsError" in _error(proc)
    proc = run([VFLOW, "data", "add", "--merge", "s3://photos/ok"], root, check=False, env=env)
    assert "a prefix is mirrored whole" in _error(proc)
    proc = run([VFLOW, "stage", "validate", "-s", "data.source=s3://photos/ok"], root,
               check=False, env=env)  # params take no URL: one line saying how
    assert proc.returncode == 2 and "vflow data add s3://photos/ok" in _error(proc)

    # on an import, --merge would be undone by the next sync: refused; a plain add
    # replaces the import, and data.dvc then records no origin
    run([VFLOW, "data", "add", "s3://photos/ok"], root, env=env)
    proc = run([VFLOW, "data", "add", "--merge", str(tmp_path / "v1")], root, check=False,
               env=env)
    assert "imports data/ from s3://photos/ok" in _error(proc)
    run([VFLOW, "data", "add", str(tmp_path / "v1")], root, env=env)
    assert dvc_origin(root / "data.dvc") == "" and snapshot(root / "data") == snap


@pytest.mark.parametrize("key", ["../evil.png", "a/../../evil.png", "/etc/x.png", "a//b.png",
                                 "a/./b.png", "a\\b.png", ""])
def test_a_key_that_could_leave_data_is_refused_naming_it(key: str):
    with pytest.raises(DataError, match="is not a safe relative path") as err:
        safe_key(URL, key)
    assert repr(key) in str(err.value)
    assert safe_key(URL, "train/cat/0.png") == "train/cat/0.png"


def test_a_prefix_is_listed_a_page_at_a_time(s3, monkeypatch):
    """`listing` follows the continuation tokens (a page of 2 keys here: 3 pages), keeps each
    key's ETag and size, and leaves out the objects beside the prefix."""
    import hashlib

    from visionflow.data.s3_sync import filesystem, listing

    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    s3c = s3.client()
    bodies = {f"train/{c}/{i}.png": f"{c}{i}".encode() * (i + 1) for c in "ab" for i in range(2)}
    bodies["test/a/0.png"] = b"test"
    for rel, body in bodies.items():
        s3c.put_object(Bucket="photos", Key=f"paged/{rel}", Body=body)
    s3c.put_object(Bucket="photos", Key="paged-not/x.png", Body=b"x")
    url = "s3://photos/paged"
    assert listing(filesystem(url), url, page_keys=2) == {
        rel: (hashlib.md5(body).hexdigest(), len(body)) for rel, body in bodies.items()}


def _train_and_register(layout: Layout, name: str = "visionflow-classifier") -> str:
    """validate, then the pipeline's run as train opens it (no training), registered as a
    version with the lineage tags register gives it; the run id."""
    from mlflow import MlflowClient

    from visionflow.mlops import registry
    from visionflow.mlops.provenance import version_tags
    from visionflow.mlops.train_run import train_run
    from visionflow.model.engine import Dist
    from visionflow.orchestration.stage_runner import run_stage

    params = load_params(layout.params)
    run_stage("validate", params, layout)
    with train_run(params, layout, "cpu", Dist()) as active:
        run_id = active.info.run_id
    client = MlflowClient(registry.client_for(layout).tracking_uri)
    if not client.search_registered_models(f"name='{name}'"):
        client.create_registered_model(name)
    client.create_model_version(name, f"runs:/{run_id}/model", run_id,
                                tags=version_tags(params, layout))
    return run_id


def test_a_version_trained_on_a_sync_has_its_data_back(tmp_path, s3, monkeypatch):
    """A version trained on a synced prefix: its run holds the `.dvc` file (git has not seen
    it: the commit tag ends in "-dirty") and names the prefix as the datasets' source; the
    refresh pushed the data, so `vflow data checkout N` brings it back, from the DVC cache
    or, with the cache gone, from the remote."""
    from visionflow.mlops import registry

    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    env = {**os.environ, **s3.env}
    first = write_imagefolder(tmp_path / "src", {"train/a": 9, "train/b": 9, "test/a": 2,
                                                 "test/b": 2})
    s3.upload(first, "photos", "run")
    root = make_project(tmp_path / "proj", write_imagefolder(tmp_path / "v1", {"a": 3, "b": 3}),
                        git=True)
    run([VFLOW, "data", "add", "s3://photos/run"], root, env=env)
    layout = Layout.at(root)
    run_id = _train_and_register(layout)
    client = registry.client_for(layout)
    got = client.download_artifacts(run_id, "dvc/data.dvc", str(tmp_path))
    assert Path(got).read_bytes() == (root / "data.dvc").read_bytes()
    assert client.get_model_version("visionflow-classifier", "1").tags[
        "lineage.git_commit"].endswith("-dirty")
    sources = {json.loads(i.dataset.source)["uri"]: i.dataset.source_type
               for i in client.get_run(run_id).inputs.dataset_inputs}
    assert sources == {"s3://photos/run": "s3"}

    s3.client().put_object(Bucket="photos", Key="run/train/a/new.png",
                           Body=(first / "train/b/000.png").read_bytes())
    assert "pushed to remote 'local'" in trigger.refresh_data(load_params(layout.params),
                                                             layout)
    second = _contents(root / "data")
    _train_and_register(layout)
    out = run([VFLOW, "data", "checkout", "1"], root, env=env).stdout
    assert out.startswith(f"data/: the data visionflow-classifier v1 was trained on (data.dvc "
                          f"md5 {dvc_md5(root / 'data.dvc')}, 22 files; data.dvc from its "
                          "run's dvc/data.dvc)"), out
    assert _contents(root / "data") == _contents(first)
    for gone in (".dvc/cache", "data"):  # a checkout without them: from the remote alone
        shutil.rmtree(root / gone)
    run([VFLOW, "data", "checkout", "v2"], root, env=env)
    assert _contents(root / "data") == second and len(second) == 23
    assert run([DVC, "status", "data.dvc"], root).stdout.strip().endswith("up to date.")


def test_an_interrupted_import_resumes_with_what_it_downloaded(tmp_path: Path):
    """An import killed mid-download (a server at 512 kB/s) leaves data/ and data.dvc as
    they were and keeps its complete downloads: the next import downloads only the rest,
    keeping those files (their inodes). A second import while one runs is refused."""
    photos = write_imagefolder(tmp_path / "photos", {"train/a": 60, "train/b": 60}, size=160)
    sizes = {p.relative_to(photos).as_posix(): p.stat().st_size for p in photos.rglob("*.png")}
    with s3_server(tmp_path / "s3", ("photos",), "--bwlimit", "512K") as slow:
        slow.upload(photos, "photos", "big")
        root = make_project(tmp_path / "proj", write_imagefolder(tmp_path / "v1", {"a": 3}),
                            git=True, mlflow_store=False)
        env, before = {**os.environ, **slow.env}, _contents(root / "data")
        dvc_before = (root / "data.dvc").read_text()

        def staged() -> Path | None:
            return next(root.glob(".cache/s3-sync/*.partial"), None)

        def complete() -> dict[str, int]:
            folder = staged()
            return {} if folder is None else {
                p.relative_to(folder).as_posix(): p.stat().st_ino for p in folder.rglob("*.png")
                if p.stat().st_size == sizes[p.relative_to(folder).as_posix()]}

        first = subprocess.Popen([VFLOW, "data", "add", "s3://photos/big"], cwd=root, env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: staged() or first.poll() is not None, 60, "the download to start")
        refused = run([VFLOW, "data", "add", "s3://photos/big"], root, check=False, env=env)
        assert "another import, sync or checkout of data/ is running" in _error(refused)
        wait_for(lambda: len(complete()) >= 8 or first.poll() is not None, 60, "8 downloads",
                 every=0.1)
        assert first.poll() is None, f"finished before it was interrupted: {first.stderr}"
        first.kill()
        first.wait(10)
        assert _contents(root / "data") == before
        assert (root / "data.dvc").read_text() == dvc_before
        kept = complete()
        # meanwhile in the bucket: one of those deleted, one replaced (same size, new ETag),
        # and a class's folder (partly downloaded) gone
        gone, changed = sorted(rel for rel in kept if rel.startswith("train/a/"))[:2]
        (photos / gone).unlink()
        lost = sorted(p.relative_to(photos).as_posix() for p in photos.glob("train/b/*"))
        shutil.rmtree(photos / "train" / "b")
        body = bytearray((photos / changed).read_bytes())
        body[-20] ^= 0xFF
        (photos / changed).write_bytes(body)
        s3c = slow.client()
        for rel in (gone, *lost):
            s3c.delete_object(Bucket="photos", Key=f"big/{rel}")
        s3c.put_object(Bucket="photos", Key=f"big/{changed}", Body=bytes(body))
        out = run([VFLOW, "data", "add", "s3://photos/big"], root, env=env).stdout
    resumed = {rel: i for rel, i in kept.items() if rel not in (gone, changed, *lost)}
    assert f"{len(_contents(photos)) - len(resumed)} objects downloaded" in out, out
    assert f", {len(resumed)} from the interrupted import" in out, out
    assert _contents(root / "data") == _contents(photos)  # without `gone`, with `changed`
    assert not (root / "data" / "train" / "b").exists()  # no empty class folder
    assert {rel: (root / "data" / rel).stat().st_ino for rel in resumed} == resumed
    assert staged() is None and not list(root.glob(".cache/s3-sync/*.partial.json"))
