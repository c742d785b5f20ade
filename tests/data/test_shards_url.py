"""`data.shards_url` and `data.shard_cache_bytes` (issue #18): a URL or cap that makes no
sense is a one-line config error (the S3 path itself is tested on the stack:
tests/pipeline/test_stack_shards.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from visionflow.core.configfile import load_params
from visionflow.core.errors import ConfigError


def test_shards_url_and_cache_cap_are_checked(tmp_path: Path):
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"data": {"source": "."}}))
    ok = load_params(p, ["data.shards_url=s3://shards/photos/"]).data
    assert ok.shards_url == "s3://shards/photos" and ok.shard_cache_bytes == 4 * 2**30
    for bad in ("/local/folder", "s3://", "https://host/bucket"):
        with pytest.raises(ConfigError, match=r"data.shards_url.*expected s3://bucket") as err:
            load_params(p, [f"data.shards_url={bad}"])
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"data.shard_cache_bytes.*three shards"):
        load_params(p, [f"data.shard_cache_bytes={40 * 2**20}"])  # 64 MiB shards
    assert load_params(p, [f"data.shard_cache_bytes={40 * 2**20}",
                           f"data.shard_bytes={8 * 2**20}"]).data.shard_cache_bytes == 40 * 2**20
