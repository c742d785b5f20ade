"""Safe archive extraction (.tar, .tar.gz, .tgz, .tar.bz2, .tar.xz, .zip).

One streaming pass with the rules of tarfile's `filter="data"`, checked here: absolute
names, '..' components, links resolving outside the target and device/fifo members are
refused with an error naming the member (the temporary target is then discarded); links
inside the archive are skipped, so no path written through can be a link; files get
default permissions (no owner, mode or setuid bits are restored).

Size limits (`ArchiveLimits`, from `data.max_archive_bytes` / `data.max_archive_members`):
the bytes actually written are counted while streaming (a header's declared size can lie)
and the members as they come; past a limit the extraction stops with a one-line error
naming the archive and the limit, and the temporary target is discarded.
"""

from __future__ import annotations

import json
import posixpath
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from visionflow.core.config import DataConfig
from visionflow.core.errors import DataError, one_line

MemberHook = Callable[[str, bytes], None]  # (archive member name, its bytes)
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".zip")
EXTRACT_MARKER = ".visionflow-extracted.json"
_READ_WHOLE_BELOW = 64 << 20  # members smaller than this are handed to the hook in memory


@dataclass(frozen=True)
class ArchiveLimits:
    """Caps on what one archive may extract to: total bytes written and member count."""

    max_bytes: int
    max_members: int

    @classmethod
    def from_params(cls, data: Any | None = None) -> ArchiveLimits:
        """From the `data` section of the params (its defaults when None)."""
        data = data if data is not None else DataConfig()
        return cls(int(data.max_archive_bytes), int(data.max_archive_members))


class _Budget:
    """Counts members and bytes written; raises once a limit is passed."""

    def __init__(self, archive: Path, limits: ArchiveLimits | None):
        self.archive, self.limits = archive, limits or ArchiveLimits.from_params()
        self.members = self.written = 0

    def _over(self, key: str, limit: int, what: str) -> DataError:
        return DataError(f"archive {self.archive} exceeds data.{key}={limit} ({what}); "
                         "nothing extracted")

    def member(self, n: int = 1) -> None:
        self.members += n
        if self.members > self.limits.max_members:
            raise self._over("max_archive_members", self.limits.max_members,
                             f"more than {self.limits.max_members} members")

    def wrote(self, n: int) -> None:
        self.written += n
        if self.written > self.limits.max_bytes:
            raise self._over("max_archive_bytes", self.limits.max_bytes,
                             f"more than {self.limits.max_bytes} bytes uncompressed")


def archive_kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".zip"):
        return "zip"
    if name.endswith(ARCHIVE_SUFFIXES):
        return "tar"
    return None


def extract_atomic(
    source: Path, kind: str, digest: str, dest: Path, on_member: MemberHook | None = None,
    limits: ArchiveLimits | None = None,
) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private
        extract = extract_tar if kind == "tar" else extract_zip
        count = extract(source, tmp, on_member, limits)
        marker = {"archive": str(source), "sha256": digest, "members": count}
        (tmp / EXTRACT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")  # last
        if dest.exists():  # a leftover without marker (crash) or a racing extraction
            if (dest / EXTRACT_MARKER).is_file():
                return
            shutil.rmtree(dest)
        try:
            tmp.rename(dest)
        except OSError:
            if not (dest / EXTRACT_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _safe_member_name(name: str, archive: Path) -> str | None:
    """Normalised posix name inside the target, or None for the root itself."""
    raw = name.replace("\\", "/")
    if raw.startswith("/") or (len(raw) > 1 and raw[1] == ":"):
        raise DataError(f"unsafe archive member {name!r} in {archive.name}: absolute path")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise DataError(f"unsafe archive member {name!r} in {archive.name}: '..' in path")
    return "/".join(parts) or None


def _link_inside(member: str, target: str, hard: bool) -> bool:
    """Whether a link `member` -> `target` stays inside the extraction root."""
    target = target.replace("\\", "/")
    if target.startswith("/") or (len(target) > 1 and target[1] == ":"):
        return False
    base = "" if hard else posixpath.dirname(member)
    joined = posixpath.normpath(posixpath.join(base, target))
    return joined != ".." and not joined.startswith("../")


def _unsafe(member: str, archive: Path, why: str) -> DataError:
    return DataError(f"unsafe archive member {member!r} in {archive.name}: {why}")


def _write_member(target: Path, name: str, src: IO[bytes], made: set[str], budget: _Budget,
                  size: int = -1, on_member: MemberHook | None = None) -> None:
    parent = posixpath.dirname(name)
    if parent not in made:
        (target / parent).mkdir(parents=True, exist_ok=True)
        made.add(parent)
    if on_member is not None and 0 <= size < _READ_WHOLE_BELOW:
        data = src.read()
        budget.wrote(len(data))
        with open(target / name, "wb") as dst:
            dst.write(data)
        on_member(name, data)
        return
    with open(target / name, "wb") as dst:
        while chunk := src.read(1 << 20):
            budget.wrote(len(chunk))  # counted before it is written
            dst.write(chunk)


def extract_tar(archive: Path, target: Path, on_member: MemberHook | None = None,
                limits: ArchiveLimits | None = None) -> int:
    """Single streaming pass with the `filter="data"` rules, checked by us.

    Absolute names, '..' components, links resolving outside the target and
    device/fifo members are refused (the temp target is then discarded). Links
    inside the archive are skipped, so no path written through can be a link;
    files get default permissions (no owner, mode or setuid bits are restored).
    """
    count = 0
    made: set[str] = {""}
    budget = _Budget(archive, limits)
    try:
        with tarfile.open(archive, "r|*") as tar:
            for m in tar:
                budget.member()
                name = _safe_member_name(m.name, archive)
                if m.issym() or m.islnk():
                    if name is None or not _link_inside(name, m.linkname, m.islnk()):
                        kind = "symlink" if m.issym() else "hardlink"
                        why = f"{kind} to {m.linkname!r} points outside the target"
                        raise _unsafe(m.name, archive, why)
                    continue  # links inside the archive are skipped
                if m.ischr() or m.isblk() or m.isfifo():
                    raise _unsafe(m.name, archive, "device or fifo file")
                if name is None:
                    continue
                if m.isdir():
                    (target / name).mkdir(parents=True, exist_ok=True)
                    made.add(name)
                elif m.isfile():
                    src = tar.extractfile(m)
                    if src is not None:
                        _write_member(target, name, src, made, budget, m.size, on_member)
                else:
                    continue  # other types (e.g. GNU volume headers): nothing to write
                count += 1
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(f"cannot read archive {archive}: {one_line(e)}") from None
    return count


def extract_zip(archive: Path, target: Path, on_member: MemberHook | None = None,
                limits: ArchiveLimits | None = None) -> int:
    budget = _Budget(archive, limits)
    try:
        with zipfile.ZipFile(archive) as zf:
            keep: list[tuple[zipfile.ZipInfo, str]] = []
            infos = zf.infolist()
            budget.member(len(infos))  # the directory is read first: refuse before writing
            declared = _Budget(archive, budget.limits)
            declared.wrote(sum(i.file_size for i in infos))  # then count what is written
            for info in infos:
                name = _safe_member_name(info.filename, archive)
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    link = zf.read(info).decode("utf-8", "replace")
                    if name is None or not _link_inside(name, link, hard=False):
                        why = f"symlink to {link!r} points outside the target"
                        raise _unsafe(info.filename, archive, why)
                    continue
                if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode):
                    raise _unsafe(info.filename, archive, "device or fifo file")
                if name is not None:
                    keep.append((info, name))
            made: set[str] = {""}
            for info, name in keep:
                if info.is_dir():
                    (target / name).mkdir(parents=True, exist_ok=True)
                    made.add(name)
                    continue
                with zf.open(info) as src:
                    _write_member(target, name, src, made, budget, info.file_size,
                                  on_member)
            return len(keep)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error, OSError) as e:
        raise DataError(f"cannot read archive {archive}: {one_line(e)}") from None
