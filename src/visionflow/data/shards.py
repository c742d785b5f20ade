"""Shards (issue #18): each split as LitData shards of encoded images, written by `pack`.

`outputs/pack/shards/<split>/` holds LitData's `index.json` and `chunk-0-K.bin` files (one
sample: label, sha256, path, the encoded image) plus `contents.json`: the samples in shard
order and the settings they were encoded with. A file's bytes are stored as they are when it
is a JPEG or PNG in RGB or greyscale whose longer side is at most `data.max_side` and that
displays as stored (no EXIF orientation turns it); any other image is decoded (turned
upright), shrunk to that side and re-encoded as a JPEG.

What a sample holds is a task's `SampleCodec`: `image_codec` here, `pair_codec` for
segmentation pairs (`data.segmentation_shards`). `store_split` packs a split for the pack
stage of either task, locally or into S3 (`data.remote_shards`).

Packing is incremental: when the split's previous samples are all still there, unchanged, and
the settings and `data.shard_bytes` are the same, only the new files are encoded, into new
shard files appended to the index (the old ones are not rewritten); otherwise the split is
packed afresh into a temporary folder swapped into place.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from visionflow.core.errors import DataError
from visionflow.core.files import atomic_dir, note_if_empty, write_json
from visionflow.data.images import load_image, turned_by_exif
from visionflow.data.remote_shards import missing_remote, split_url, upload_split

CONTENTS = "contents.json"
INDEX = "index.json"
FORMAT = 2  # bump when the sample layout changes: old shards are then packed afresh
# (2: EXIF-turned JPEGs stored upright)
KEPT_FORMATS = {"JPEG": "jpeg", "PNG": "png"}
KEPT_MODES = {3: ("RGB",), 1: ("L",)}
REENCODE_QUALITY = 90
ENCODE_CHUNK = 64  # images a packing worker encodes per job
IN_FLIGHT = 4  # jobs per worker encoded ahead of the writer (bounds packing's memory)


def decoded_bytes(n_images: int, channels: int, size: int) -> int:
    """Bytes of the uint8 N×C×S×S tensor cache."""
    return n_images * channels * size * size


TENSOR_NOTE = "tensor_mode.json"


def note_tensor_mode(shards_dir: Path) -> None:
    """`shards/` is a DVC output in both storage modes: in tensor mode it holds just this note
    (`core.files.note_if_empty`); call it once pack has written or cleared the split folders."""
    note_if_empty(shards_dir, TENSOR_NOTE, {
        "storage": "tensor", "images": "outputs/pack/packed.pt",
        "why": "data.storage chose tensor: no shards for this data"})


def storage_for(storage: str, n_images: int, channels: int, size: int, budget: int) -> str:
    """`tensor` or `shards`: `auto` keeps the tensor cache while it fits the byte budget."""
    if storage != "auto":
        return storage
    return "tensor" if decoded_bytes(n_images, channels, size) <= budget else "shards"


def encode(row: dict[str, Any], root: str, max_side: int, channels: int) -> tuple[bytes, bool]:
    """The bytes a shard stores for a manifest row, and whether they were re-encoded."""
    path = Path(root) / row["path"]
    w, h = int(row.get("width") or 0), int(row.get("height") or 0)
    if (row.get("format") in KEPT_FORMATS and row.get("mode") in KEPT_MODES[channels]
            and 0 < max(w, h) <= max_side):
        data = path.read_bytes()
        if not turned_by_exif(data):  # the decoders at train time ignore EXIF
            return data, False
    img = load_image(path, channels)  # upright, as validate measured it
    img.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=REENCODE_QUALITY)
    return buf.getvalue(), True


@dataclass
class PackStats:
    samples: int = 0
    encoded: int = 0  # images read and written this run (new or repacked)
    reencoded: int = 0  # of those, decoded and encoded again (too large, or not JPEG/PNG)
    reused: int = 0  # samples already in the shards, not touched
    shards: int = 0


def read_contents(split_dir: Path) -> dict[str, Any] | None:
    path = split_dir / CONTENTS
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class SampleCodec:
    """How one task's manifest rows become shard samples: `settings` (in `contents.json`: a
    change packs the split afresh), `key` (a row with the same key is kept), `contents_row`
    (what `contents.json` lists) and `encode` (row -> (sample, re-encoded); picklable: it runs
    in packing workers)."""

    settings: dict[str, Any]
    key: Callable[[dict[str, Any]], tuple[str, ...]]
    contents_row: Callable[[dict[str, Any]], dict[str, str]]
    encode: Callable[[dict[str, Any]], tuple[dict[str, Any], bool]]


def _image_key(r: dict[str, Any]) -> tuple[str, ...]:
    return (r["sha256"], r["label"], r["path"])


def _image_row(r: dict[str, Any]) -> dict[str, str]:
    return {"sha256": r["sha256"], "label": r["label"], "path": r["path"]}


def _image_sample(row: dict[str, Any], *, root: str, max_side: int, channels: int,
                  index: dict[str, int]) -> tuple[dict[str, Any], bool]:
    data, again = encode(row, root, max_side, channels)
    return {"label": index[row["label"]], "sha256": row["sha256"], "path": row["path"],
            "image": data}, again


def image_codec(root: Path, classes: list[str], *, max_side: int, channels: int) -> SampleCodec:
    """Classification: one labelled image a sample."""
    return SampleCodec(
        {"format": FORMAT, "max_side": max_side, "channels": channels, "classes": classes},
        _image_key, _image_row,
        partial(_image_sample, root=str(root), max_side=max_side, channels=channels,
                index={c: i for i, c in enumerate(classes)}))


def pack_split(rows: list[dict[str, Any]], root: Path, split_dir: Path, classes: list[str],
               *, max_side: int, channels: int, shard_bytes: int, workers: int = 0) -> PackStats:
    """Write (or extend) the shards of one split of images from its manifest rows."""
    return pack_rows(rows, split_dir, image_codec(root, classes, max_side=max_side,
                                                  channels=channels),
                     shard_bytes=shard_bytes, workers=workers)


def pack_rows(rows: list[dict[str, Any]], split_dir: Path, codec: SampleCodec, *,
              shard_bytes: int, workers: int = 0) -> PackStats:
    """Write (or extend) the shards of one split: when the split's previous rows are all
    still there (same keys, same settings, the index whole) only the new ones are encoded,
    into new shard files; otherwise the split is packed afresh."""
    old = read_contents(split_dir)
    same = old and old.get("settings") == codec.settings \
        and old.get("shard_bytes", shard_bytes) == shard_bytes  # older shards: not recorded
    old_rows = old["samples"] if same else None
    if old_rows is not None and not _index_matches(split_dir, len(old_rows)):
        old_rows = None
    if old_rows is not None:
        have = {codec.key(r) for r in old_rows}
        if have <= {codec.key(r) for r in rows}:
            new = sorted((r for r in rows if codec.key(r) not in have),
                         key=lambda r: r["sha256"])
            if not new:
                return PackStats(len(old_rows), reused=len(old_rows),
                                 shards=shard_count(split_dir))
            return _append(old_rows, new, split_dir, codec, shard_bytes, workers)
    with atomic_dir(split_dir) as tmp:
        rows = sorted(rows, key=lambda r: r["sha256"])  # by content: shards mix the classes
        stats = _write(rows, tmp, codec, shard_bytes, workers, 0)
        _write_contents(tmp, codec, rows, shard_bytes)
    return stats


def _append(old_rows: list[dict[str, Any]], new: list[dict[str, Any]], split_dir: Path,
            codec: SampleCodec, shard_bytes: int, workers: int) -> PackStats:
    index = _index(split_dir)
    tmp = Path(tempfile.mkdtemp(prefix=".append.", dir=split_dir))
    try:
        stats = _write(new, tmp, codec, shard_bytes, workers, len(index["chunks"]))
        added = _index(tmp)
        if added["config"] != index["config"]:
            raise DataError(f"{split_dir}: new samples do not match the shards' layout")
        for chunk in added["chunks"]:  # new file names: the index does not list them yet
            os.replace(tmp / chunk["filename"], split_dir / chunk["filename"])
        rows = old_rows + [codec.contents_row(r) for r in new]
        _write_contents(split_dir, codec, rows, shard_bytes, listed=True)
        write_json(split_dir / INDEX, {**index, "chunks": index["chunks"] + added["chunks"]})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    stats.reused, stats.samples = len(old_rows), len(rows)
    stats.shards = len(index["chunks"]) + len(added["chunks"])
    return stats


def _write_contents(split_dir: Path, codec: SampleCodec, rows: list[dict], shard_bytes: int,
                    listed: bool = False) -> None:
    """`contents.json`: the settings, the shard size and the samples (`listed`: `rows` are
    contents rows already)."""
    write_json(split_dir / CONTENTS, {
        "settings": codec.settings, "shard_bytes": shard_bytes,
        "samples": rows if listed else [codec.contents_row(r) for r in rows]})


def _encode_chunk(encode_row: Callable[[dict[str, Any]], tuple[dict[str, Any], bool]],
                  rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], bool]]:
    return [encode_row(r) for r in rows]


def _encoded(rows: list[dict[str, Any]], codec: SampleCodec, workers: int
             ) -> Iterator[tuple[dict[str, Any], bool]]:
    workers = workers or os.cpu_count() or 1
    if len(rows) < 256 or workers == 1:
        yield from (codec.encode(r) for r in rows)
        return
    # at most `IN_FLIGHT` chunks of samples wait to be written: `pool.map` would submit them
    # all at once and hold every finished sample in memory (the whole split, when the
    # workers read faster than the writer writes)
    chunks = (rows[i:i + ENCODE_CHUNK] for i in range(0, len(rows), ENCODE_CHUNK))
    with ProcessPoolExecutor(workers) as pool:
        pending: deque[Future[list[tuple[dict[str, Any], bool]]]] = deque()
        for chunk in chunks:
            pending.append(pool.submit(_encode_chunk, codec.encode, chunk))
            if len(pending) >= IN_FLIGHT * workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


def _write(rows: list[dict[str, Any]], out: Path, codec: SampleCodec, shard_bytes: int,
           workers: int, first_chunk: int) -> PackStats:
    from litdata.streaming.writer import BinaryWriter

    writer = BinaryWriter(str(out), chunk_bytes=shard_bytes, chunk_index=first_chunk)
    stats = PackStats()
    for i, (sample, again) in enumerate(_encoded(rows, codec, workers)):
        writer[i] = sample
        stats.encoded += 1
        stats.reencoded += int(again)
    writer.done()
    writer.merge()
    stats.samples = len(rows)
    stats.shards = shard_count(out) if rows else 0
    return stats


def _index(split_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((split_dir / INDEX).read_text())
    except (OSError, ValueError):
        return {"chunks": [], "config": None}


def _index_matches(split_dir: Path, n: int) -> bool:
    return sum(c["chunk_size"] for c in _index(split_dir)["chunks"]) == n


def shard_count(split_dir: Path) -> int:
    """The number of shard files the split's index lists (0 without an index)."""
    return len(_index(split_dir)["chunks"])


def indexed_samples(split_dir: Path, split: str) -> int:
    """The number of samples the split's index lists (one-line error without an index)."""
    if not (split_dir / INDEX).is_file():
        raise DataError(f"no shards for split {split!r}: {split_dir / INDEX} is missing "
                        "(run the pack stage)")
    index = _index(split_dir)
    if not index["chunks"] and index["config"] is None:
        raise DataError(f"corrupt shard index {split_dir / INDEX} (split {split!r})")
    return sum(c["chunk_size"] for c in index["chunks"])


def local_shards_whole(split_dir: Path) -> bool:
    """Every shard file the index names is here, of its indexed size."""
    return all((split_dir / c["filename"]).is_file()
               and (split_dir / c["filename"]).stat().st_size == c["chunk_bytes"]
               for c in _index(split_dir)["chunks"])


def check_shards(split_dir: Path, split: str) -> int:
    """Every shard of the split is there, whole (size as indexed): the number of samples.

    LitData waits for a local shard shorter than its index says (as for a download still
    under way): a truncated file would hang training instead of failing, so it is checked
    here first. A shard of the right size whose bytes are damaged fails when read
    (`stream.ShardStream`), naming it too."""
    n = indexed_samples(split_dir, split)
    for chunk in _index(split_dir)["chunks"]:
        path = split_dir / chunk["filename"]
        size = path.stat().st_size if path.is_file() else -1
        if size != chunk["chunk_bytes"]:
            what = "missing" if size < 0 else f"{size} bytes, indexed {chunk['chunk_bytes']}"
            raise DataError(f"corrupt shard {path} (split {split!r}): {what}")
    return n


def chunk_file(split_dir: Path, chunk_index: int) -> Path:
    return split_dir / _index(split_dir)["chunks"][chunk_index]["filename"]


def store_split(rows: list[dict[str, Any]], split_dir: Path, codec: SampleCodec, *, split: str,
                base_url: str | None, shard_bytes: int, workers: int) -> PackStats:
    """Pack one split's rows into shards, appending when its shards are all still there
    (locally, or in S3 with `base_url`), and upload the new shard files to `base_url`."""
    url = split_url(base_url, split) if base_url else None
    gone = (missing_remote(split_dir, url) if url
            else None if local_shards_whole(split_dir) else "local shards")
    if gone:  # the old shards cannot be appended to: pack the split afresh
        print(f"pack {split}: packed afresh ({gone} missing)", flush=True)
        shutil.rmtree(split_dir, ignore_errors=True)
    stats = pack_rows(rows, split_dir, codec, shard_bytes=shard_bytes, workers=workers)
    if url:
        sent = upload_split(split_dir, url)
        print(f"pack {split}: {sent} shard files uploaded to {url}", flush=True)
    return stats
