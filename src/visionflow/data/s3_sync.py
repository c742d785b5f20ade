"""Images kept in S3 as a DVC data version: the prefix mirrored into `data/`, downloading only
what changed, then `dvc add`.

DVC's own `import-url` + `dvc update` downloads the whole prefix again whenever any object in
it changed (treeverse/dvc#4889, #8808): 1% new photos of 10,000 took as long as the first
import (BENCHMARKS "Images in S3"). Here s3fs lists the prefix (ETag and size per key), new
or changed keys are downloaded concurrently into a copy of `data/` made of hard links to the
unchanged files, keys the bucket no longer has are left out, and the copy replaces `data/`
whole (on any error `data/` stays as it was). The copy is staged in `.cache/s3-sync/`: an
import that stops part-way (killed, a lost connection) keeps its complete downloads there,
and the next one downloads only the rest. `dvc add` then hashes only the downloaded files
(its state cache knows the others by inode and mtime). `data.dvc` records the prefix
(`meta.source`), so a retrain's data refresh syncs again; the ETags seen are kept in
`.cache/s3-sync/` (without them, a local file whose md5 is a single-part ETag is kept).
Endpoint and keys: the usual AWS_* variables.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from visionflow.core.errors import DataError
from visionflow.core.files import load_yaml, walk_files, write_text
from visionflow.core.layout import Layout
from visionflow.data.dvc import dvc_md5

CONCURRENCY = 32  # downloads in flight (s3fs's batch)


@dataclass
class SyncReport:
    listed: int = 0  # objects under the prefix
    downloaded: int = 0
    kept: int = 0  # unchanged, linked from the current version
    removed: int = 0  # in the current version, no longer in the bucket
    bytes: int = 0  # downloaded
    resumed: int = 0  # downloaded by an import that stopped part-way, kept


def filesystem(url: str) -> Any:
    """An s3fs file system on the AWS_* environment (one line when the client is missing)."""
    if not url.startswith("s3://"):
        raise DataError(f"data add: {url}: only s3:// URLs are read")
    try:
        import s3fs
    except ImportError as err:
        raise DataError(f"data add: {url}: the S3 client is missing: pip install "
                        "'visionflow[team]' (or 'dvc[s3]')") from err
    return s3fs.S3FileSystem(skip_instance_cache=True)


def safe_key(url: str, rel: str) -> str:
    """A key's path below the prefix, refused (one line naming it) when it could leave
    `data/`: absolute, `..`, empty or `.` segments, backslashes."""
    parts = rel.split("/")
    if not rel or "\\" in rel or any(p in ("", ".", "..") for p in parts):
        raise DataError(f"data add: {url}: key {rel!r} is not a safe relative path")
    return str(PurePosixPath(*parts))


def listing(fs: Any, url: str, page_keys: int = 1000) -> dict[str, tuple[str, int]]:
    """{path below the prefix: (ETag, size)} of every object under `url`, listed a page of
    `page_keys` at a time (`list_objects_v2`), so that only those two fields of each key are
    held, not a whole s3fs entry (a third of the memory: BENCHMARKS "Listing a prefix")."""
    bucket, _, key = url.removeprefix("s3://").rstrip("/").partition("/")
    prefix = f"{key}/" if key else ""
    args: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": page_keys}
    out: dict[str, tuple[str, int]] = {}
    while True:
        try:
            page = fs.call_s3("list_objects_v2", **args)
        except Exception as err:  # noqa: BLE001 (PermissionError, NoCredentialsError, ...)
            raise DataError(f"data add: {url}: {_first_line(err)}") from err
        for obj in page.get("Contents", ()):
            rel, size = obj["Key"][len(prefix):], int(obj.get("Size") or 0)
            if not rel or (rel.endswith("/") and not size):  # a console's folder key
                continue
            out[safe_key(url, rel)] = (str(obj.get("ETag", "")).strip('"'), size)
        if not page.get("IsTruncated"):
            break
        args["ContinuationToken"] = page["NextContinuationToken"]
    if not out:
        raise DataError(f"data add: {url}: no objects under this prefix")
    return out


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"


def _state_file(layout: Layout, url: str, target: str) -> Path:
    tag = hashlib.sha256(f"{url}\n{target}".encode()).hexdigest()[:16]
    return layout.cache_root / "s3-sync" / f"{tag}.json"


def _unchanged(path: Path, etag: str, size: int, seen: list | None) -> bool:
    """Whether the local file already holds the object: the ETag recorded when it was
    downloaded, else an md5 equal to a single-part ETag."""
    try:  # (a link into DVC's cache, with `cache.type symlink`, reads as its file)
        if not path.is_file() or path.stat().st_size != size:
            return False
    except OSError:
        return False
    if seen is not None:
        return list(seen) == [etag, size]
    if len(etag) != 32 or "-" in etag:  # a multipart ETag is no md5
        return False
    with path.open("rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest() == etag


def staging(layout: Layout, target: str) -> Path:
    """Where a sync into `target/` stages the new version (kept when it stops part-way)."""
    tag = hashlib.sha256(target.encode()).hexdigest()[:16]
    return layout.cache_root / "s3-sync" / f"{tag}.partial"


def sync(layout: Layout, url: str, target: str, staged: Path
         ) -> tuple[SyncReport, dict[str, tuple[str, int]]]:
    """Write the prefix's files at `staged`: the unchanged ones linked from `target/`, the
    complete downloads of an earlier try that stopped part-way kept (its listing says for
    which ETag), the rest downloaded; and the listing, for `record` once `staged` is the new
    version. Nothing is staged when `target/` already holds the prefix as it is. `target/`
    itself is not touched; call under `data.add`'s lock on `target/`."""
    fs = filesystem(url)
    objects = listing(fs, url)
    current = layout.root / target
    seen = _seen(layout, url, target)
    report = SyncReport(listed=len(objects))
    keep = [rel for rel, (etag, size) in objects.items()
            if _unchanged(current / rel, etag, size, seen.get(rel) if seen else None)]
    fetch = sorted(set(objects) - set(keep))
    if current.is_dir():
        report.removed = sum(1 for p in walk_files(current) if p.is_file()
                             and p.relative_to(current).as_posix() not in objects)
    report.kept = len(keep)
    tried = _tried(staged)
    resumed = {rel for rel in fetch if tried.get(rel) == list(objects[rel])
               and _unchanged(staged / rel, *objects[rel], list(objects[rel]))}
    _clear(staged, resumed)
    if not fetch and not report.removed and current.is_dir():
        finished(staged)
        return report, objects  # `target/` is the prefix: nothing staged
    write_text(_tried_file(staged), _compact(objects))
    for folder in {(staged / rel).parent for rel in objects}:
        folder.mkdir(parents=True, exist_ok=True)
    for rel in keep:
        try:
            os.link(current / rel, staged / rel)
        except OSError:  # no hard links here
            shutil.copy2(current / rel, staged / rel)
    base = url.removeprefix("s3://").rstrip("/")
    get = [rel for rel in fetch if rel not in resumed]
    try:
        fs.get([f"{base}/{rel}" for rel in get], [str(staged / rel) for rel in get],
               batch_size=CONCURRENCY)
    except Exception as err:  # noqa: BLE001 (the S3 client's errors: one line)
        raise DataError(f"data add: {url}: download failed: {_first_line(err)} (the "
                        "complete downloads are kept for the next try)") from err
    report.downloaded, report.resumed = len(get), len(resumed)
    report.bytes = sum(objects[rel][1] for rel in get)
    return report, objects


def finished(staged: Path) -> None:
    """The staged folder and its listing gone (once it became the new version, or when
    nothing was to be staged)."""
    shutil.rmtree(staged, ignore_errors=True)
    _tried_file(staged).unlink(missing_ok=True)


def _tried_file(staged: Path) -> Path:
    return staged.with_suffix(".json")


def _tried(staged: Path) -> dict[str, list]:
    """The listing an earlier sync staged for ({} when none)."""
    try:
        tried = json.loads(_tried_file(staged).read_text()) if staged.is_dir() else {}
    except (OSError, ValueError):
        return {}
    return tried if isinstance(tried, dict) else {}


def _clear(staged: Path, resumed: set[str]) -> None:
    """Every file under `staged` removed but the `resumed` ones (links to the current
    version are made again, partial downloads downloaded again), and the folders left empty
    (a class the bucket no longer has would read as an empty class)."""
    if not staged.is_dir():
        return
    for path in walk_files(staged):
        if path.relative_to(staged).as_posix() not in resumed:
            path.unlink()
    for top, _, _ in os.walk(staged, topdown=False):  # the deepest folders first
        if top != str(staged) and not os.listdir(top):
            os.rmdir(top)


def _seen(layout: Layout, url: str, target: str) -> dict[str, list] | None:
    """The ETags `record` kept for `target/`, while `target.dvc` still records that version
    (None otherwise)."""
    try:
        state = json.loads(_state_file(layout, url, target).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or state.get("md5") != dvc_md5(layout.dvc_file(target)):
        return None
    return state.get("objects") or {}


def record(layout: Layout, url: str, target: str, objects: dict[str, tuple[str, int]]) -> None:
    """After `dvc add target`: `target.dvc` names the prefix (`meta.source`, which `dvc add`
    keeps), and the ETags are kept for the next sync."""
    dvc_file = layout.dvc_file(target)
    meta = load_yaml(dvc_file.read_text()) or {}
    out = meta["outs"][0]
    if (out.get("meta") or {}).get("source") != url:
        out["meta"] = {**(out.get("meta") or {}), "source": url}
        write_text(dvc_file, yaml.safe_dump(meta, sort_keys=False))
    write_text(_state_file(layout, url, target),
               _compact({"md5": dvc_md5(dvc_file), "objects": objects}))


def _compact(obj: Any) -> str:
    """JSON without indents or a copy of the listing (its (ETag, size) tuples are arrays)."""
    return json.dumps(obj, separators=(",", ":"))
