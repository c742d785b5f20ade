"""Shards (issue #18): the storage rule, incremental packing, resumable and DDP-disjoint
streams, and the one-line error for a damaged shard."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import pack_shards, shard_photos
from PIL import Image

from visionflow.core.errors import DataError
from visionflow.data.shards import (
    TENSOR_NOTE,
    check_shards,
    note_tensor_mode,
    read_contents,
    storage_for,
)
from visionflow.data.stream import ShardStream, View


def test_storage_rule():
    # digits at 16 px: 1,797 x 3 x 16 x 16 bytes, far below the 2 GiB default
    assert storage_for("auto", 1797, 3, 16, 2 * 2**30) == "tensor"
    assert storage_for("auto", 100_000, 3, 224, 2 * 2**30) == "shards"  # 15 GB of tensor
    assert storage_for("shards", 10, 3, 16, 2**30) == "shards"
    assert storage_for("tensor", 10**7, 3, 224, 1) == "tensor"


def test_the_shards_folder_says_tensor_mode_and_shards_mode_clears_it(tmp_path):
    note_tensor_mode(tmp_path)  # a DVC output never left empty (DVC warns)
    assert [p.name for p in tmp_path.iterdir()] == [TENSOR_NOTE]
    (tmp_path / "train").mkdir()
    note_tensor_mode(tmp_path)  # the same project switched to shards
    assert [p.name for p in tmp_path.iterdir()] == ["train"]


def test_large_images_are_reencoded_small_ones_kept(tmp_path):
    rows = shard_photos(tmp_path / "src", 12)
    stats = pack_shards(rows, tmp_path / "src", tmp_path / "shards", max_side=400)
    big = sum(max(r["width"], r["height"]) > 400 for r in rows)
    assert (stats.samples, stats.encoded, stats.reencoded) == (12, 12, big)
    stream = ShardStream(tmp_path / "shards", "train", View(64, 73, raw=True),
                         batch_size=4, workers=0, shuffle=False, drop_last=False)
    kept = {r["sha256"] for r in rows if max(r["width"], r["height"]) <= 400}
    seen = {hashlib.sha256(b.numpy().tobytes()).hexdigest() for xs, _ in stream.epoch()
            for b in xs}
    assert kept <= seen and len(seen) == 12  # kept bytes as they were, the others re-encoded


def test_adding_ten_percent_encodes_only_the_new_files(tmp_path):
    src, out = tmp_path / "src", tmp_path / "shards"
    rows = shard_photos(src, 40)
    first = pack_shards(rows, src, out)
    assert first.shards > 1
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.glob("chunk-*.bin")}
    more = rows + shard_photos(src, 4, start=40)
    second = pack_shards(more, src, out)
    assert (second.encoded, second.reused, second.samples) == (4, 40, 44)
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.glob("chunk-*.bin")}
    assert all(after[name] == before[name] for name in before)  # old shards untouched
    assert len(after) > len(before)
    assert check_shards(out, "train") == 44
    assert [r["sha256"] for r in read_contents(out)["samples"]][:40] == \
        [r["sha256"] for r in sorted(rows, key=lambda r: r["sha256"])]
    # a file removed: the split is packed afresh
    third = pack_shards(more[1:], src, out)
    assert (third.encoded, third.reused, check_shards(out, "train")) == (43, 0, 43)


def test_a_new_shard_size_packs_the_split_afresh(tmp_path):
    src, out = tmp_path / "src", tmp_path / "shards"
    rows = shard_photos(src, 12)
    first = pack_shards(rows, src, out, shard_bytes=1 << 16)
    again = pack_shards(rows, src, out, shard_bytes=1 << 16)
    assert (again.encoded, again.reused) == (0, 12)
    bigger = pack_shards(rows, src, out, shard_bytes=1 << 22)  # data.shard_bytes changed
    assert (bigger.encoded, bigger.reused) == (12, 0)
    assert bigger.shards == 1 < first.shards
    assert read_contents(out)["shard_bytes"] == 1 << 22 and check_shards(out, "train") == 12


def test_stream_resumes_mid_epoch_at_the_next_batch(tmp_path):
    src, out = tmp_path / "src", tmp_path / "shards"
    pack_shards(shard_photos(src, 24), src, out)
    view = View(32, 37, train=True, hflip=0.5)

    def stream():
        return ShardStream(out, "train", view, batch_size=4, workers=0, seed=3)

    unbroken = stream()
    full, second = list(unbroken.epoch()), list(unbroken.epoch())
    assert len(full) == 6
    cut = stream()
    it = cut.epoch()
    for _ in range(2):
        next(it)
    state = cut.state_dict()
    resumed = stream()
    resumed.load_state_dict(state)
    rest = list(resumed.epoch(4))  # as training reads it: the epoch's count, then no more
    assert len(rest) == 4  # batches 3..6, none of the first two again
    for (x, y), (rx, ry) in zip(full[2:], rest, strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry)  # same images, same crops
    # the next epoch is a whole one (not the restored position again), as without the cut
    for (x, y), (rx, ry) in zip(second, resumed.epoch(), strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_truncated_shard_is_one_line_naming_shard_and_split(tmp_path):
    src, out = tmp_path / "src", tmp_path / "shards"
    pack_shards(shard_photos(src, 12), src, out)
    shard = sorted(out.glob("chunk-*.bin"))[0]
    with shard.open("r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    with pytest.raises(DataError) as err:
        ShardStream(out, "val", View(32, 37), batch_size=4, workers=0)
    msg = str(err.value)
    assert str(shard) in msg and "'val'" in msg and "\n" not in msg


@pytest.mark.parametrize("workers", [0, 1])
def test_damaged_bytes_are_one_line_naming_shard_and_split(tmp_path, workers):
    src, out = tmp_path / "src", tmp_path / "shards"
    pack_shards(shard_photos(src, 6), src, out)
    shard = sorted(out.glob("chunk-*.bin"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 3:] = bytes(len(data) - len(data) // 3)  # zeros: same size
    shard.write_bytes(bytes(data))
    stream = ShardStream(out, "train", View(32, 37), batch_size=2, workers=workers,
                         shuffle=False, drop_last=False)
    with pytest.raises(DataError) as err:
        list(stream.epoch())
    msg = str(err.value)
    assert msg.startswith("corrupt shard ") and str(shard) in msg and "'train'" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("workers", [0, 1])
def test_a_shard_never_downloaded_is_late_not_corrupt(tmp_path, monkeypatch, workers):
    """LitData's wait for a download running out (S3 slow or gone) is named as that, in one
    line naming the shard and split: the shard itself is fine."""
    from litdata import StreamingDataset
    from litdata.exceptions import ChunkWaitTimeoutError

    src, out = tmp_path / "src", tmp_path / "shards"
    pack_shards(shard_photos(src, 6), src, out)

    def never_arrives(self, index):
        raise ChunkWaitTimeoutError("chunk-0-0.bin", 120.0)

    monkeypatch.setattr(StreamingDataset, "__getitem__", never_arrives)
    stream = ShardStream(out, "train", View(32, 37), batch_size=2, workers=workers,
                         shuffle=False, drop_last=False)
    with pytest.raises(DataError) as err:
        list(stream.epoch())
    msg = str(err.value)
    assert msg.startswith("shard not downloaded in time ") and "corrupt" not in msg, msg
    assert str(sorted(out.glob("chunk-*.bin"))[0]) in msg and "'train'" in msg
    assert "\n" not in msg


def _rank_samples(rank: int, world: int, out: str, port: int, result: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        stream = ShardStream(Path(out), "train", View(32, 37, train=True, raw=True),
                             batch_size=2, workers=0, seed=0)
        seen = [hashlib.sha256(b.numpy().tobytes()).hexdigest()
                for xs, _ in stream.epoch() for b in xs]
        Path(result, f"{rank}.txt").write_text("\n".join(seen))
        # what the train stage's val top-1, its calibration and its stats sample read
        whole = ShardStream(Path(out), "train", View(32, 37, raw=True), batch_size=2,
                            workers=0, shuffle=False, drop_last=False)
        seen = [hashlib.sha256(b.numpy().tobytes()).hexdigest()
                for xs, _ in whole.epoch() for b in xs]
        Path(result, f"{rank}.eval.txt").write_text("\n".join(seen))
        # from S3: each rank its own cache folder and its share of the cap
        from visionflow.data.remote_shards import RemoteSplit
        from visionflow.data.stream import _rank_cache

        folder, cap = _rank_cache(RemoteSplit("s3://b/p/train", Path(result, "cache"), 100))
        Path(result, f"{rank}.cache.txt").write_text(f"{folder.name} {cap}")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_read_disjoint_samples_whose_union_is_the_epoch(tmp_path):
    """Training: each rank its own shards. Evaluating (val top-1, calibration, the stats
    sample) in a process group: every rank reads the whole split, each sample once. From S3,
    each rank caches in its own folder with its share of the cap."""
    import torch.multiprocessing as mp

    from visionflow.orchestration.servers import free_port

    src, out = tmp_path / "src", tmp_path / "shards"
    rows = shard_photos(src, 32)
    pack_shards(rows, src, out, shard_bytes=1 << 15)
    mp.spawn(_rank_samples, args=(2, str(out), free_port(), str(tmp_path)), nprocs=2)
    a, b = ((tmp_path / f"{r}.txt").read_text().split() for r in (0, 1))
    assert a and b and not set(a) & set(b)
    assert set(a) | set(b) == {r["sha256"] for r in rows}
    for rank in (0, 1):
        seen = (tmp_path / f"{rank}.eval.txt").read_text().split()
        assert sorted(seen) == sorted(r["sha256"] for r in rows), (rank, len(seen), len(rows))
        # ranks sharing one capped folder stalled each other (BENCHMARKS, session 14)
        assert (tmp_path / f"{rank}.cache.txt").read_text() == f"rank{rank} 42"  # 85 // 2


def test_served_model_sees_what_evaluation_saw(tmp_path):
    """predict / the pyfunc on a full-size JPEG: the evaluation view of the shards (resize the
    shorter side, centre crop), not the tensor cache's stretch."""
    from visionflow.mlops.pyfunc_classifier import to_batch

    src, out = tmp_path / "src", tmp_path / "shards"
    rows = shard_photos(src, 6)
    pack_shards(rows, src, out)
    stream = ShardStream(out, "test", View(64, 80), batch_size=6, workers=0, shuffle=False,
                         drop_last=False)
    (x, _), = list(stream.epoch())
    order = [r["path"] for r in read_contents(out)["samples"]]
    served = to_batch([(src / p).read_bytes() for p in order], 64, 3, resize=80)
    assert served.shape == tuple(x.shape)
    assert np.abs(served.astype(int) - x.numpy().astype(int)).max() <= 2
    stretched = to_batch([(src / p).read_bytes() for p in order], 64, 3)
    assert np.abs(stretched.astype(int) - x.numpy().astype(int)).max() > 20


def test_a_phone_photo_turned_by_exif_is_stored_upright(tmp_path):
    """A JPEG whose EXIF says "turn 90 degrees" (portrait phone photos): the shard holds it
    upright, as validate measured it and as the served model and the tensor cache read it."""
    from visionflow.mlops.pyfunc_classifier import to_batch

    src, out = tmp_path / "src", tmp_path / "shards"
    rows = shard_photos(src, 2)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    stored = np.zeros((120, 200, 3), np.uint8)
    stored[:, :100] = 255  # left half white as stored: the top half when displayed
    Image.fromarray(stored).save(src / "ants" / "turned.jpg", quality=95, exif=exif.tobytes())
    rows.append(rows[0] | {"path": "ants/turned.jpg", "width": 120, "height": 200,
                           "sha256": "turned"})
    assert pack_shards(rows, src, out).reencoded == 1
    stream = ShardStream(out, "test", View(64, 64), batch_size=3, workers=0, shuffle=False,
                         drop_last=False)
    (x, _), = list(stream.epoch())
    turned = x[[r["path"] for r in read_contents(out)["samples"]].index("ants/turned.jpg")]
    top, bottom = turned[:, :32].float().mean(), turned[:, 32:].float().mean()
    assert top > 200 > 50 > bottom, (top, bottom)
    served = to_batch([(src / "ants" / "turned.jpg").read_bytes()], 64, 3, resize=64)[0]
    assert np.abs(served.astype(int) - turned.numpy().astype(int)).max() <= 8


def test_packing_holds_a_bounded_number_of_images_whatever_the_split_size(tmp_path,
                                                                          monkeypatch):
    """The writer is the slow end: the encoding workers may run ahead of it by at most
    `IN_FLIGHT` jobs each, so a split of any size is never held in memory at once."""
    from visionflow.data import shards

    src, log = tmp_path / "src", tmp_path / "encoded.log"
    (src / "ants").mkdir(parents=True)
    data = (tmp_path / "one.jpg")
    Image.new("RGB", (8, 8)).save(data)
    rows = []
    for i in range(1500):
        (src / "ants" / f"{i}.jpg").write_bytes(data.read_bytes())
        rows.append({"path": f"ants/{i}.jpg", "label": "ants", "format": "JPEG",
                     "mode": "RGB", "width": 8, "height": 8, "sha256": str(i)})
    real = shards.encode

    def counted(*args):  # runs in the pool's forked workers
        with log.open("a") as f:
            f.write("x\n")
        return real(*args)

    monkeypatch.setattr(shards, "encode", counted)
    codec = shards.image_codec(src, ["ants"], max_side=1024, channels=3)
    encoded = shards._encoded(rows, codec, workers=2)
    next(encoded)  # the writer takes one image and stalls
    seen, last = -1, time.monotonic()
    while time.monotonic() - last < 1.0:  # until the workers stop encoding
        n = len(log.read_text().splitlines()) if log.exists() else 0
        if n != seen:
            seen, last = n, time.monotonic()
        time.sleep(0.05)
    assert seen <= 2 * shards.IN_FLIGHT * shards.ENCODE_CHUNK < len(rows)
    assert len(list(encoded)) == len(rows) - 1  # and the rest still comes, in order
