"""A real S3 server for one test module: `rclone serve s3` (the team stack's object store) over
a temporary folder, without the rest of the stack. No tests, no fixtures here."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from builders import wait_for

ACCESS, SECRET = "vflowtest", "vflowtestsecret"


@dataclass
class S3Server:
    endpoint: str
    root: Path  # the served folder: one folder per bucket

    @property
    def env(self) -> dict[str, str]:
        """What a client (boto3, DVC's S3 plugin) needs: the usual AWS variables."""
        from visionflow.stack import objectstore

        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS,
                "AWS_SECRET_ACCESS_KEY": SECRET, **objectstore.CLIENT_ENV}

    def client(self):
        from visionflow.stack import objectstore

        return objectstore.client(self.endpoint, ACCESS, SECRET)

    def upload(self, folder: Path, bucket: str, prefix: str) -> int:
        """Every file under `folder` to `s3://bucket/prefix/<relative path>`, by the S3 API."""
        s3, n = self.client(), 0
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            s3.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(folder).as_posix()}",
                          Body=path.read_bytes())
            n += 1
        return n


@contextlib.contextmanager
def s3_server(root: Path, buckets: tuple[str, ...], *flags: str) -> Iterator[S3Server]:
    """An S3 server on a free port serving `root` (with rclone's `flags`, e.g. `--bwlimit`);
    skips without rclone (fails under VFLOW_REQUIRE_STACK=1, as the stack tests do)."""
    from visionflow.orchestration.servers import free_port
    from visionflow.stack import objectstore
    from visionflow.stack.procs import StackError

    try:
        objectstore.rclone()
    except StackError as err:
        if os.environ.get("VFLOW_REQUIRE_STACK") == "1":
            pytest.fail(f"rclone required (VFLOW_REQUIRE_STACK=1) but: {err}")
        pytest.skip(str(err))
    for bucket in buckets:
        (root / bucket).mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = [*objectstore.command(root, "127.0.0.1", port), *flags]
    proc = subprocess.Popen(cmd, env={**os.environ, **objectstore.server_env(ACCESS, SECRET)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = S3Server(objectstore.endpoint("127.0.0.1", port), root)
    try:
        wait_for(lambda: _answers(server) or proc.poll() is not None, 20, "the S3 server")
        assert proc.poll() is None, "rclone serve s3 exited"
        yield server
    finally:
        proc.terminate()
        proc.wait(10)


def _answers(server: S3Server) -> bool:
    try:
        server.client().list_buckets()
        return True
    except Exception:  # noqa: BLE001 (not up yet)
        return False
