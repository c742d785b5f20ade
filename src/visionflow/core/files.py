"""Files: atomic outputs (a temp file in the same directory, then a rename), CSV, hashing."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path next to `path`; on success rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temp directory next to `path`; on success swap it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def note_if_empty(folder: str | Path, name: str, note: dict[str, Any]) -> None:
    """Call once a stage has written a DVC output folder: DVC warns on every commit of an
    empty one, so it then holds `name` (a note saying why it is empty), and only then."""
    path = Path(folder) / name
    path.unlink(missing_ok=True)
    if not any(Path(folder).iterdir()):
        write_json(path, note)


def write_with(path: str | Path, writer: Callable[[Path], Any]) -> None:
    """Call `writer(tmp_path)` and move the result into place."""
    with atomic_path(path) as tmp:
        writer(tmp)


def torch_save(obj: Any, path: str | Path) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def write_csv(path: str | Path, rows: Iterable[dict[str, Any]] | Iterable[Sequence[Any]],
              header: Sequence[str] | None = None) -> None:
    """Rows as dicts (columns: `header`, else the keys in first-seen order) or as sequences
    (`header` written first when given), atomically."""
    rows = list(rows)
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        if rows and not isinstance(rows[0], dict):
            w = csv.writer(f)
            if header is not None:
                w.writerow(header)
            w.writerows(rows)
            return
        keys = list(header) if header is not None else list(
            dict.fromkeys(k for row in rows for k in row))
        dw = csv.DictWriter(f, fieldnames=keys)
        dw.writeheader()
        dw.writerows(rows)


def read_json(path: str | Path, default: Any = None) -> Any:
    """The parsed file; `default` when it is missing or not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser: ~10x faster


def walk_files(folder: str | Path) -> Iterator[Path]:
    """Every entry under `folder` that is not a directory (a link to one included, not
    followed), sorted within each directory. Holds one directory's names at a time, where
    `Path.rglob` keeps every path it yielded (0.5 kB a file: BENCHMARKS "Listing a prefix")."""
    for top, dirs, files in os.walk(folder):
        dirs.sort()
        links = [d for d in dirs if os.path.islink(os.path.join(top, d))]
        for name in sorted(files + links):
            yield Path(top, name)


def load_yaml(text: str) -> Any:
    """`yaml.safe_load`, parsed by libyaml where PyYAML was built with it (the same result)."""
    return yaml.load(text, Loader=_YAML_LOADER)  # noqa: S506 (a safe loader)
