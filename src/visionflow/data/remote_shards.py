"""Shards in S3 (issue #18, `data.shards_url`): upload after packing, check, local cache.

With `data.shards_url: s3://bucket/prefix` the pack stage uploads each split's shard files to
`<url>/<split>/` (new shard files first, then `contents.json` and `index.json` last, so a reader
never sees an index naming a missing shard) and deletes its local copies: the DVC output
`outputs/pack/shards/<split>/` then holds only the two small JSON files, and every stage
streams the shards from S3 through LitData, which keeps a local cache of the shards it reads
under `.cache/shards/<split>/<index hash>/`, evicting read ones to stay under
`data.shard_cache_bytes`. The cache folder is named by the index's hash: a repacked split
never reads stale shards of the same name.

The endpoint and keys come from the environment as for any S3 client (`AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`; `vflow stack up` writes them to `env.sh`, and the
stack's workers have them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from visionflow.core.dataconfig import CACHE_HEADROOM
from visionflow.core.errors import DataError

CONTENTS = "contents.json"
INDEX = "index.json"


@dataclass(frozen=True)
class RemoteSplit:
    """Where one split's shards live in S3 and where this host caches them."""

    url: str  # s3://bucket/prefix/<split>
    cache_dir: Path
    cache_bytes: int

    @property
    def litdata_cache_bytes(self) -> int:
        return int(self.cache_bytes * CACHE_HEADROOM)


def split_url(base: str, split: str) -> str:
    return f"{base.rstrip('/')}/{split}"


def s3_client() -> Any:
    """boto3 on the environment's endpoint and keys; path-style and classic checksums for
    S3 look-alikes (rclone, MinIO) when an endpoint is set."""
    import os

    import boto3
    from botocore.config import Config

    custom = bool(os.environ.get("AWS_ENDPOINT_URL"))
    config = Config(s3={"addressing_style": "path"} if custom else {},
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                    retries={"max_attempts": 3}, connect_timeout=10, read_timeout=120)
    return boto3.client("s3", config=config)


def _bucket_key(url: str) -> tuple[str, str]:
    u = urlparse(url)
    return u.netloc, u.path.strip("/")


def remote_sizes(url: str) -> dict[str, int]:
    """Object name -> size of every object directly under `url`/."""
    bucket, prefix = _bucket_key(url)
    s3 = s3_client()
    out: dict[str, int] = {}
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                 Prefix=prefix + "/"):
            for o in page.get("Contents", []):
                out[o["Key"][len(prefix) + 1:]] = int(o["Size"])
    except Exception as e:  # no endpoint, keys or bucket: one line
        raise DataError(f"cannot list {url}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]}") from None
    return out


def _index(split_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((split_dir / INDEX).read_text())
    except (OSError, ValueError):
        return {"chunks": []}


def missing_remote(split_dir: Path, url: str) -> str | None:
    """Why the shards the local index names are not all in S3, whole (None when they are)."""
    chunks = _index(split_dir)["chunks"]
    if not chunks:
        return None
    have = remote_sizes(url)
    for c in chunks:
        size = have.get(c["filename"], -1)
        if size != c["chunk_bytes"]:
            what = "missing" if size < 0 else f"{size} bytes, indexed {c['chunk_bytes']}"
            return f"{url}/{c['filename']}: {what}"
    return None


def upload_split(split_dir: Path, url: str) -> int:
    """Upload the shard files present locally (the ones written by this pack), then the
    contents and the index; the local shard files are deleted once uploaded. The number of
    shard files uploaded."""
    bucket, prefix = _bucket_key(url)
    s3 = s3_client()
    names = [c["filename"] for c in _index(split_dir)["chunks"]]
    local = [n for n in names if (split_dir / n).is_file()]
    try:
        for name in local:
            s3.upload_file(str(split_dir / name), bucket, f"{prefix}/{name}")
        for name in (CONTENTS, INDEX):
            if (split_dir / name).is_file():
                s3.upload_file(str(split_dir / name), bucket, f"{prefix}/{name}")
    except Exception as e:
        raise DataError(f"cannot upload {split_dir} to {url}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]}") from None
    for name in local:
        (split_dir / name).unlink()
    return len(local)


def remote_split(split_dir: Path, base_url: str, split: str, cache_root: Path,
                 cache_bytes: int) -> RemoteSplit:
    """The split's S3 location and this host's cache folder for its current index (older
    index versions' caches of the split are removed)."""
    try:
        digest = hashlib.sha256((split_dir / INDEX).read_bytes()).hexdigest()[:16]
    except OSError:
        raise DataError(f"no shards for split {split!r}: {split_dir / INDEX} is missing "
                        "(run the pack stage, or `dvc pull` its output)") from None
    parent = cache_root / split
    if parent.is_dir():
        for old in parent.iterdir():
            if old.name != digest:
                shutil.rmtree(old, ignore_errors=True)
    (parent / digest).mkdir(parents=True, exist_ok=True)
    return RemoteSplit(split_url(base_url, split), parent / digest, cache_bytes)


def allow_plain_http() -> None:
    """LitData fetches shards with obstore, which refuses an `http://` endpoint (a local S3
    server such as the stack's) unless told to allow it."""
    from litdata.streaming import downloader

    options = getattr(downloader, "_OBSTORE_CLIENT_OPTIONS", None)
    if isinstance(options, dict):
        options["allow_http"] = True


def size_bound_cache() -> None:
    """Bound the cache by its size, not by LitData's shared chunk-slot counter.

    LitData 0.2.76 also counts "slots" in a file its DataLoader workers share. With two
    workers the count drifted above the chunks on disk (14 of 14 slots taken, 12 chunks), and
    then every download waited out LitData's 30 s slot timeout; with 35 shards through a
    16 MiB cap every epoch failed after 120 s (BENCHMARKS, "S3 streaming: 30 s stalls",
    `bench/bench_s3_stream.py`). Its size check, which deletes read shards while the folder
    is over the budget, still bounds the cache (CACHE_HEADROOM covers the shards in flight);
    `test_stack_shards` measures the peak and checks the counter's file never appears.
    """
    from litdata.streaming.reader import PrepareChunksThread

    if hasattr(PrepareChunksThread, "_slot_budget_enabled"):
        PrepareChunksThread._slot_budget_enabled = lambda self: False  # type: ignore[method-assign]


class _NoCacheSizeAdvice(logging.Filter):
    """LitData advises a cache of at least 25 GB on every stream; the cap is the user's."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "max_cache_size" not in record.getMessage()


def quiet_cache_advice() -> None:
    logging.getLogger("litdata.streaming.dataset").addFilter(_NoCacheSizeAdvice())
