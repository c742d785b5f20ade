"""Per-file checks for the data gate: hash, decode and describe each image, on all cores.

`inspect_image` never raises for bad image data: it records a reason (one of
`images.REASONS`) and a one-line detail, so validate can quarantine the file.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visionflow.core.errors import one_line
from visionflow.core.files import sha256_file
from visionflow.data.images import (
    DEFAULT_MAX_PIXELS,
    READ_WHOLE_BELOW,
    ImageProblem,
    channel_stats,
    check_channels,
    normalise,
    open_loaded,
)

_IN_PROCESS_BELOW = 500


@dataclass(slots=True)
class ImageInfo:
    path: str
    width: int = 0  # after EXIF orientation
    height: int = 0
    mode: str = ""  # mode as stored in the file
    format: str = ""
    bytes: int = 0
    sha256: str = ""
    decodable: bool = False
    reason: str | None = None  # one of REASONS, None when fine
    error: str | None = None  # one-line detail
    mean: tuple[float, ...] = ()  # per channel, 0..1, after normalisation
    std: tuple[float, ...] = ()
    frames: int = 1

    @property
    def ok(self) -> bool:
        return self.reason is None


def inspect_image(
    path: Path,
    channels: int = 3,
    *,
    min_width: int = 1,
    min_height: int = 1,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ImageInfo:
    """Hash, decode and describe one file. Never raises for bad image data."""
    check_channels(channels)
    path = Path(path)
    info = ImageInfo(path=str(path))
    try:
        size = path.stat().st_size
        info.bytes = size
        if size == 0:
            info.reason, info.error = "zero_byte", "file is empty"
            return info
        if size < READ_WHOLE_BELOW:
            data = path.read_bytes()
            info.sha256 = hashlib.sha256(data).hexdigest()
            source: Path | io.BytesIO = io.BytesIO(data)
        else:
            info.sha256 = sha256_file(path)
            source = path
    except OSError as e:
        info.reason, info.error = "undecodable", f"cannot read file: {one_line(e)}"
        return info
    return _inspect_decoded(info, source, channels, min_width, min_height, max_pixels)


def inspect_bytes(
    data: bytes,
    name: str = "<bytes>",
    channels: int = 3,
    *,
    min_width: int = 1,
    min_height: int = 1,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ImageInfo:
    """`inspect_image` for a file's content already in memory (`name` is only reported)."""
    check_channels(channels)
    info = ImageInfo(path=name, bytes=len(data))
    if not data:
        info.reason, info.error = "zero_byte", "file is empty"
        return info
    info.sha256 = hashlib.sha256(data).hexdigest()
    return _inspect_decoded(info, io.BytesIO(data), channels, min_width, min_height, max_pixels)


def _inspect_decoded(info: ImageInfo, source: Path | io.BytesIO, channels: int,
                     min_width: int, min_height: int, max_pixels: int) -> ImageInfo:
    try:
        img = open_loaded(source, max_pixels)
        info.format, info.mode = img.format or "", img.mode
        info.frames = int(getattr(img, "n_frames", 1) or 1)
        norm = normalise(img, channels)
    except ImageProblem as p:
        info.reason, info.error = p.reason, p.detail
        return info
    except Exception as e:  # any decoder failure is a data problem
        info.reason, info.error = "undecodable", one_line(e)
        return info
    info.decodable = True
    info.width, info.height = norm.size
    info.mean, info.std = channel_stats(norm)
    if info.width < min_width or info.height < min_height:
        info.reason = "too_small"
        info.error = f"{info.width}x{info.height} is below the minimum {min_width}x{min_height}"
    return info


def _inspect_chunk(paths: list[str], channels: int, limits: dict[str, Any]) -> list[ImageInfo]:
    return [inspect_image(Path(p), channels, **limits) for p in paths]


def inspect_many(
    paths: Sequence[Path | str], channels: int = 3, workers: int = 0, **limits: Any
) -> list[ImageInfo]:
    """`inspect_image` over many files, in a process pool (workers=0: all cores).

    Results are in the order of `paths`. Fewer than 500 files run in-process.
    `limits` are passed to `inspect_image` (min_width, min_height, max_pixels).
    """
    check_channels(channels)
    names = [str(p) for p in paths]
    workers = workers or os.cpu_count() or 1
    if len(names) < _IN_PROCESS_BELOW or workers <= 1:
        return _inspect_chunk(names, channels, limits)

    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    # fork: no re-import of __main__ (works from unguarded scripts) and fast start;
    # workers only run pure decoding code.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    chunk = max(16, min(256, -(-len(names) // (workers * 4))))
    chunks = [names[i : i + chunk] for i in range(0, len(names), chunk)]
    out: list[ImageInfo] = []
    try:
        with ProcessPoolExecutor(workers, mp_context=mp.get_context(method)) as pool:
            futures = [pool.submit(_inspect_chunk, c, channels, limits) for c in chunks]
            for f in futures:
                out.extend(f.result())
    except BrokenProcessPool:  # e.g. a worker killed: finish in-process
        out.extend(_inspect_chunk(names[len(out) :], channels, limits))
    return out


def _inspect_blobs(blobs: list[tuple[str, bytes]], channels: int, max_pixels: int
                   ) -> list[ImageInfo]:
    return [inspect_bytes(data, name, channels, max_pixels=max_pixels) for name, data in blobs]


class BackgroundInspector:
    """Inspect (name, bytes) blobs in a process pool while the caller produces them.

    Used as `resolve_source(..., on_member=inspector.submit)`: images are decoded on all
    cores while the archive is still being extracted. The pool starts on the first blob;
    at most ~2 batches per worker are in flight (bounded memory). `finish()` returns
    {name: ImageInfo}; a broken pool just yields fewer results (the caller inspects the
    rest the ordinary way).
    """

    def __init__(self, channels: int = 3, workers: int = 0,
                 max_pixels: int = DEFAULT_MAX_PIXELS, batch_files: int = 256,
                 batch_bytes: int = 16 << 20) -> None:
        check_channels(channels)
        self.channels, self.max_pixels = channels, max_pixels
        self.workers = workers or os.cpu_count() or 1
        self.batch_files, self.batch_bytes = batch_files, batch_bytes
        self.results: dict[str, ImageInfo] = {}
        self._batch: list[tuple[str, bytes]] = []
        self._size = 0
        self._pool: Any = None
        self._futures: deque[Any] = deque()
        self._broken = False

    def submit(self, name: str, data: bytes) -> None:
        if self._broken:
            return
        self._batch.append((name, data))
        self._size += len(data)
        if len(self._batch) >= self.batch_files or self._size >= self.batch_bytes:
            self._flush()

    def _flush(self) -> None:
        batch, self._batch, self._size = self._batch, [], 0
        if not batch or self._broken:
            return
        if self.workers <= 1:
            for info in _inspect_blobs(batch, self.channels, self.max_pixels):
                self.results[info.path] = info
            return
        if self._pool is None:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            self._pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context(method))
        self._futures.append(self._pool.submit(_inspect_blobs, batch, self.channels,
                                               self.max_pixels))
        while len(self._futures) > 2 * self.workers:
            self._collect(self._futures.popleft())

    def _collect(self, future: Any) -> None:
        try:
            for info in future.result():
                self.results[info.path] = info
        except Exception:  # e.g. a killed worker: those files get inspected later
            self._broken = True

    def finish(self) -> dict[str, ImageInfo]:
        self._flush()
        while self._futures:
            self._collect(self._futures.popleft())
        self.close()
        return self.results

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._futures.clear()
