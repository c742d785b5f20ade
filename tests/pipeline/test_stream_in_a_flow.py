"""A shard stream with loader processes, read whole inside a Prefect flow in this process (how
`flows/retrain.py` runs train in shards mode). The loader's forked workers inherit Prefect's
exit hooks: with Prefect 3.8 each worker then exited with code 1, and the end of an epoch
raised "DataLoader worker exited unexpectedly" in the flow (Prefect 3.9 fixed the hook)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from builders import pack_shards, shard_photos

pytestmark = pytest.mark.slow

SCRIPT = """
import sys
from pathlib import Path
from prefect import flow
from visionflow.data.stream import ShardStream, View

@flow(name="read-shards")
def read_two_epochs(split_dir: str) -> list[int]:
    stream = ShardStream(Path(split_dir), "train", View(32, 36), batch_size=2, workers=1,
                         shuffle=False, drop_last=False)
    return [sum(len(y) for _, y in stream.epoch()) for _ in range(2)]

print("images per epoch:", read_two_epochs(sys.argv[1]))
"""


def test_a_flow_reads_whole_epochs_through_loader_processes(tmp_path: Path,
                                                            prefect_server: str):
    rows = shard_photos(tmp_path / "src", 6)
    pack_shards(rows, tmp_path / "src", tmp_path / "shards")
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "shards")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "images per epoch: [6, 6]" in res.stdout
    assert "exited unexpectedly" not in res.stderr
