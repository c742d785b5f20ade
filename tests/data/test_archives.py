"""Data sources: safe archive extraction (every known attack refused), archive limits,
and `import_dataset`."""

from __future__ import annotations

import hashlib
import os
import tarfile
import zipfile
from pathlib import Path

import pytest
from builders import encode, evil_tar, evil_zip, small_dataset, snapshot, tar_member, tar_of, zip_of
from PIL import Image

from visionflow.core.errors import DataError
from visionflow.data import scan, source
from visionflow.data.archive import EXTRACT_MARKER, ArchiveLimits

# ---------------------------------------------------------------------------
# archives


@pytest.mark.parametrize(
    ("name", "maker", "arcroot"),
    [
        ("data.tar.gz", tar_of, ""),
        ("data.tgz", tar_of, "mydata"),
        ("data.tar", lambda p, s, a: tar_of(p, s, a, "w"), ""),
        ("data.zip", zip_of, ""),
        ("nested.zip", zip_of, "mydata"),
        ("readme.tgz", tar_of, "withreadme"),
    ],
)
def test_good_archives_extract_and_are_reused(tmp_path, monkeypatch, name, maker, arcroot):
    src = small_dataset(tmp_path / "src")
    if arcroot == "withreadme":  # a wrapper folder that also holds a README
        (src / "README.md").write_text("cifar-like")
    archive = maker(tmp_path / name, src, arcroot)
    cache = tmp_path / "cache"
    root = source.resolve_source(archive, cache)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()[:16]
    expected = cache / digest / arcroot if arcroot else cache / digest
    assert root == expected.resolve()
    visible = sorted(n for n in os.listdir(root) if not n.startswith("."))
    assert visible == (["README.md"] if "README.md" in visible else []) + ["test", "train"]
    found = scan.scan_imagefolder(root)
    assert [e.relpath for e in found.entries] == [
        "test/dog/4.png",
        "train/cat/1.png",
        "train/cat/sub/2.png",
        "train/dog/3.png",
    ]
    assert (root / "train/cat/1.png").read_bytes() == (src / "train/cat/1.png").read_bytes()
    assert sorted(os.listdir(cache)) == [digest]  # no temp dirs left
    marker = cache / digest / EXTRACT_MARKER
    assert marker.is_file()

    def boom(*a, **k):
        raise AssertionError("extracted again")

    monkeypatch.setattr(source, "extract_atomic", boom)
    assert source.resolve_source(archive, cache) == root


def test_incomplete_extraction_is_redone(tmp_path):
    archive = tar_of(tmp_path / "d.tar.gz", small_dataset(tmp_path / "src"))
    cache = tmp_path / "cache"
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()[:16]
    (cache / digest / "train").mkdir(parents=True)  # crash leftover: no marker
    (cache / digest / "train" / "partial.png").write_bytes(b"\x89PNG")
    root = source.resolve_source(archive, cache)
    assert not (root / "train" / "partial.png").exists()
    assert (root / "train" / "dog" / "3.png").is_file()


def test_directory_source_and_bad_sources(tmp_path):
    src = small_dataset(tmp_path / "src")
    assert source.resolve_source(src, tmp_path / "cache") == src.resolve()
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="notes.txt"):
        source.resolve_source(tmp_path / "notes.txt", tmp_path / "cache")
    with pytest.raises(DataError, match="missing.tar"):
        source.resolve_source(tmp_path / "missing.tar", tmp_path / "cache")
    (tmp_path / "corrupt.tar.gz").write_bytes(b"\x1f\x8b" + b"garbage" * 20)
    with pytest.raises(DataError, match="corrupt.tar.gz"):
        source.resolve_source(tmp_path / "corrupt.tar.gz", tmp_path / "cache")
    (tmp_path / "corrupt.zip").write_bytes(b"PK\x03\x04" + b"garbage" * 20)
    with pytest.raises(DataError, match="corrupt.zip"):
        source.resolve_source(tmp_path / "corrupt.zip", tmp_path / "cache")


@pytest.mark.parametrize(
    ("suffix", "make"),
    [
        (".tar.gz", evil_tar("absolute")),
        (".tar.gz", evil_tar("dotdot")),
        (".tar.gz", evil_tar("symlink")),
        (".tar.gz", evil_tar("symlink_abs")),
        (".tar.gz", evil_tar("hardlink")),
        (".tar.gz", evil_tar("fifo")),
        (".tar.gz", evil_tar("device")),
        (".zip", evil_zip("dotdot")),
        (".zip", evil_zip("absolute")),
    ],
    ids=[
        "tar-absolute",
        "tar-dotdot",
        "tar-symlink-out",
        "tar-symlink-abs",
        "tar-hardlink-out",
        "tar-fifo",
        "tar-device",
        "zip-dotdot",
        "zip-absolute",
    ],
)
def test_archive_attacks_refused(tmp_path, suffix, make):
    archive = tmp_path / "in" / f"evil{suffix}"
    archive.parent.mkdir()
    member = make(archive)
    cache = tmp_path / "work" / "cache"
    cache.mkdir(parents=True)
    before = snapshot(tmp_path)
    before_tmp = set(os.listdir("/tmp"))
    with pytest.raises(DataError) as err:
        source.resolve_source(archive, cache)
    msg = str(err.value)
    assert member in msg and "evil" in msg and "\n" not in msg
    assert snapshot(tmp_path) == before  # nothing written anywhere, temp dir removed
    assert not (set(os.listdir("/tmp")) - before_tmp) & {"visionflow-evil-abs.txt", "evil.txt"}


def test_links_inside_archive_are_skipped(tmp_path):
    archive = tmp_path / "links.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar_member(tar, "cat/a.png", encode(Image.new("L", (8, 8)), "PNG"))
        tar_member(tar, "cat/b.png", type=tarfile.SYMTYPE, linkname="a.png")
        tar_member(tar, "cat/c.png", type=tarfile.LNKTYPE, linkname="cat/a.png")
        tar_member(tar, "dog/d.png", encode(Image.new("L", (8, 8)), "PNG"))
    root = source.resolve_source(archive, tmp_path / "cache")
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png")) == [
        "cat/a.png",
        "dog/d.png",
    ]


# ---------------------------------------------------------------------------
# archive limits: bytes actually written and members, refused in one line, nothing left


def _bomb_tar(path: Path, size: int = 3 << 20) -> Path:
    """A small .tar.gz whose one member inflates to `size` zero bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        tar_member(tar, "train/cat/ok.png", encode(Image.new("L", (8, 8)), "PNG"))
        tar_member(tar, "train/cat/zeros.png", bytes(size))
    return path


def _many_zip(path: Path, n: int) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(n):
            zf.writestr(f"train/cat/{i}.png", b"x")
    return path


@pytest.mark.parametrize("hook", [False, True], ids=["streamed", "decoded-while-extracting"])
def test_archive_byte_limit_counts_what_is_written(tmp_path, hook):
    archive = _bomb_tar(tmp_path / "in" / "bomb.tar.gz")
    assert archive.stat().st_size < 20_000  # 3 MiB inflated from a few KB
    cache = tmp_path / "cache"
    cache.mkdir()
    before = snapshot(tmp_path)
    seen: list[str] = []
    limits = ArchiveLimits(max_bytes=1 << 20, max_members=100)
    with pytest.raises(DataError) as err:
        source.resolve_source(archive, cache, (lambda n, d: seen.append(n)) if hook else None,
                              limits)
    msg = str(err.value)
    assert "\n" not in msg and str(archive) in msg and "data.max_archive_bytes=1048576" in msg
    assert snapshot(tmp_path) == before  # the partial extraction is gone
    assert "train/cat/zeros.png" not in seen
    # the same archive under the default limits extracts
    assert (source.resolve_source(archive, cache) / "train/cat/zeros.png").stat().st_size \
        == 3 << 20


def _bomb_zip(path: Path, size: int = 3 << 20) -> Path:
    """A small image first, then `size` zeros deflated to a few KB."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("train/cat/ok.png", encode(Image.new("L", (8, 8)), "PNG"))
        zf.writestr("train/cat/zeros.png", bytes(size))
    return path


def test_zip_byte_limit_refuses_before_writing_anything(tmp_path):
    """A zip's directory declares its sizes: one past the limit is refused before the first
    member is written (not even the small image before the bomb), with one line."""
    from visionflow.data.archive import extract_zip

    archive = _bomb_zip(tmp_path / "in" / "bomb.zip")
    assert archive.stat().st_size < 20_000
    limits = ArchiveLimits(max_bytes=1 << 20, max_members=100)
    cache = tmp_path / "cache"
    cache.mkdir()
    before = snapshot(tmp_path)
    seen: list[str] = []
    with pytest.raises(DataError) as err:
        source.resolve_source(archive, cache, lambda n, d: seen.append(n), limits)
    msg = str(err.value)
    assert "\n" not in msg and str(archive) in msg and "data.max_archive_bytes=1048576" in msg
    assert "nothing extracted" in msg
    assert seen == [] and snapshot(tmp_path) == before
    with pytest.raises(DataError, match="exceeds data.max_archive_bytes"):
        source.import_dataset(archive, tmp_path / "imported", limits)
    assert snapshot(tmp_path) == before
    target = tmp_path / "target"
    target.mkdir()
    with pytest.raises(DataError, match="exceeds data.max_archive_bytes"):
        extract_zip(archive, target, None, limits)
    assert list(target.iterdir()) == []  # refused on the directory, before any write
    assert (source.resolve_source(archive, cache) / "train/cat/zeros.png").stat().st_size \
        == 3 << 20  # the default limits extract it


def test_archive_member_limit(tmp_path):
    for archive in (_many_zip(tmp_path / "many.zip", 30),
                    tar_of(tmp_path / "many.tar", _many_zip_tree(tmp_path / "tree", 30), "", "w")):
        cache = tmp_path / f"cache-{archive.name}"
        with pytest.raises(DataError, match=r"exceeds data\.max_archive_members=20 "):
            source.resolve_source(archive, cache, None, ArchiveLimits(1 << 30, 20))
        assert not cache.exists() or not any(cache.iterdir())
        with pytest.raises(DataError, match=str(archive.name)):
            source.import_dataset(archive, tmp_path / "imported", ArchiveLimits(1 << 30, 20))
        assert not (tmp_path / "imported").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".imported")]
        assert source.resolve_source(archive, cache, None, ArchiveLimits(1 << 30, 100)).is_dir()


def _many_zip_tree(root: Path, n: int) -> Path:
    for i in range(n):
        (root / "train" / "cat").mkdir(parents=True, exist_ok=True)
        (root / "train" / "cat" / f"{i}.png").write_bytes(b"x")
    return root


def test_archive_limits_come_from_params(tmp_path):
    from visionflow.core.configfile import parse_params

    data = parse_params({"data": {"max_archive_bytes": 5, "max_archive_members": 7}}).data
    assert ArchiveLimits.from_params(data) == ArchiveLimits(5, 7)
    assert ArchiveLimits.from_params() == ArchiveLimits(100 * 2**30, 5_000_000)


# ---------------------------------------------------------------------------
# importing a dataset (`vflow data add`)


def test_import_folder_copies_files_and_skips_unsafe_links(tmp_path):
    src = small_dataset(tmp_path / "wrap" / "mydata")  # a single wrapper folder: unwrapped
    (tmp_path / "secret.png").write_bytes(b"secret")
    (src / "train" / "cat" / "out.png").symlink_to(tmp_path / "secret.png")
    (src / "train" / "cat" / "in.png").symlink_to(src / "train" / "dog" / "3.png")
    (src / "train" / "cat" / ".DS_Store").write_bytes(b"x")
    before = snapshot(tmp_path / "wrap")
    report = source.import_dataset(tmp_path / "wrap", tmp_path / "out")
    got = sorted(p.relative_to(tmp_path / "out").as_posix()
                 for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert got == ["test/dog/4.png", "train/cat/1.png", "train/cat/in.png",
                   "train/cat/sub/2.png", "train/dog/3.png"]
    assert not any(p.is_symlink() for p in (tmp_path / "out").rglob("*"))
    assert [(r.relpath, r.reason) for r in report.skipped] == [("train/cat/out.png",
                                                                 "outside_root")]
    assert report.files == 5 and report.kind == "folder"
    assert snapshot(tmp_path / "wrap") == before
    with pytest.raises(DataError, match="already exists"):
        source.import_dataset(tmp_path / "wrap", tmp_path / "out")


def test_import_archive_refuses_attacks_and_leaves_nothing(tmp_path):
    archive = tar_of(tmp_path / "d.tgz", small_dataset(tmp_path / "src"), "mydata")
    report = source.import_dataset(archive, tmp_path / "new")
    assert report.kind == "tar" and report.files == 4
    assert (tmp_path / "new" / "train" / "cat" / "sub" / "2.png").is_file()
    evil = tmp_path / "evil.tar.gz"
    member = evil_tar("hardlink")(evil)
    with pytest.raises(DataError, match=member):
        source.import_dataset(evil, tmp_path / "bad")
    assert sorted(os.listdir(tmp_path)) == ["d.tgz", "evil.tar.gz", "new", "src"]


def test_import_keeps_what_a_segmentation_layout_reads(tmp_path):
    """`vflow data add` of a segmentation set: `classes.txt` (the class names) and VOC's
    `ImageSets/` (the splits) hold no image, but the layout reads them; clutter still goes."""
    from seg_projects import write_voc

    voc = write_voc(tmp_path / "voc", n=8, bad=0)
    (voc / "notes").mkdir()
    (voc / "notes" / "todo.txt").write_text("clutter")
    report = source.import_dataset(voc, tmp_path / "out")
    assert report.ignored == ["notes/"]
    for rel in ("classes.txt", "ImageSets/Segmentation/train.txt",
                "ImageSets/Segmentation/val.txt"):
        assert (tmp_path / "out" / rel).read_bytes() == (voc / rel).read_bytes(), rel
