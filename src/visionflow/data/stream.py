"""Streaming the shards (issue #18): LitData's loader, decode and transforms per sample.

Training (`train=True`): `torchvision.io.decode_image`, then transforms v2 RandomResizedCrop
(`data.crop_scale`, `data.crop_ratio`) to `data.image_size` and a horizontal flip
(`augment.hflip`); evaluation: resize the shorter side to `data.resize_size` and centre crop,
as torchvision's classification references do. Each sample's randomness is seeded from
(seed, epoch, sample index), so a run is the same whatever the worker count and after a
resume. With `raw=True` the samples stay encoded (1-D uint8 tensors, collated as a list) for a
device-side decoder (the CUDA path).

`ShardStream` wraps LitData's `StreamingDataLoader`: its `state_dict` taken mid-epoch resumes
at the next batch (`load_state_dict`); under DDP each rank reads its own shards of a training
stream (LitData assigns them), disjoint, their union the epoch, while an evaluation stream
(the val top-1, the calibration and the stats sample of the train stage) reads the whole split
on whichever rank opens it: LitData would split it by rank too, and drop the remainder.
Shards are checked whole before the first read (`shards.check_shards`), and a sample that
cannot be read or decoded stops the run with one line naming the shard and the split.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from litdata import StreamingDataLoader, StreamingDataset
from litdata.exceptions import ChunkWaitTimeoutError
from litdata.streaming.resolver import Dir
from litdata.utilities.env import _DistributedEnv
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

from visionflow.core.errors import DataError
from visionflow.data.remote_shards import (
    RemoteSplit,
    allow_plain_http,
    missing_remote,
    quiet_cache_advice,
    size_bound_cache,
)
from visionflow.data.shards import check_shards, chunk_file, indexed_samples

CORRUPT = "corrupt shard"
LATE = "shard not downloaded in time"  # LitData gave up waiting for it: not damaged
allow_plain_http()
quiet_cache_advice()
size_bound_cache()


@dataclass(frozen=True)
class View:
    """How the samples of a split are turned into training or evaluation images."""

    size: int
    resize: int
    channels: int = 3
    train: bool = False
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 4 / 3)
    hflip: float = 0.0
    raw: bool = False  # keep the bytes encoded (a device decoder takes them)

    def transform(self) -> v2.Transform:
        if self.train:
            steps: list[v2.Transform] = [v2.RandomResizedCrop(
                self.size, scale=self.crop_scale, ratio=self.crop_ratio, antialias=True)]
            if self.hflip > 0:
                steps.append(v2.RandomHorizontalFlip(self.hflip))
            return v2.Compose(steps)
        return v2.Compose([v2.Resize(self.resize, antialias=True), v2.CenterCrop(self.size)])


def decode(data: torch.Tensor, channels: int) -> torch.Tensor:
    mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
    return decode_image(data, mode=mode)


class ShardDataset(StreamingDataset):
    """A split's shards; items are (uint8 C×S×S image, label), or (encoded bytes, label)."""

    def __init__(self, split_dir: Path, split: str, view: View, *, seed: int,
                 shuffle: bool, remote: RemoteSplit | None = None) -> None:
        if remote is None:
            super().__init__(str(split_dir), shuffle=shuffle, seed=seed, drop_last=None)
        else:  # streamed from S3 into a capped local cache
            cache_dir, cache_bytes = _rank_cache(remote)
            super().__init__(Dir(path=str(cache_dir), url=remote.url), shuffle=shuffle,
                             seed=seed, drop_last=None, max_cache_size=cache_bytes)
        if not view.train:  # evaluation: the whole split, whatever the process group
            self.distributed_env, self.drop_last = _DistributedEnv(1, 0, 1), False
        self.split_dir, self.split, self.view, self.base_seed = split_dir, split, view, seed
        self.s3_cache = cache_dir if remote is not None else None  # this rank's cache folder
        self.where = remote.url if remote is not None else str(split_dir)
        self._transform = view.transform()

    def __getitem__(self, index: Any) -> Any:
        try:
            return self.sample(super().__getitem__(index), int(getattr(index, "index", index)))
        except DataError:
            raise
        except Exception as e:  # damaged bytes (LitData's or the decoder's error), or late
            where = getattr(index, "chunk_index", None)
            shard = (f"{self.where}/{chunk_file(self.split_dir, where).name}"
                     if where is not None else self.where)
            what = LATE if isinstance(e, ChunkWaitTimeoutError) else CORRUPT
            raise DataError(f"{what} {shard} (split {self.split!r}): "
                            f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None

    def sample(self, item: dict[str, Any], number: int) -> tuple[torch.Tensor, int]:
        """One stored sample as the view wants it (a subclass stores other samples)."""
        data = torch.frombuffer(bytearray(item["image"]), dtype=torch.uint8)
        if self.view.raw:
            return data, int(item["label"])
        img = decode(data, self.view.channels)
        with torch.random.fork_rng(devices=[]):  # per sample: same with any worker count
            torch.manual_seed(hash((self.base_seed, self.current_epoch, number)) % 2**62)
            img = self._transform(img)
        return img, int(item["label"])


def _rank_cache(remote: RemoteSplit) -> tuple[Path, int]:
    """Under DDP each rank caches in its own folder with its share of the cap: LitData bounds
    a folder by its size, and ranks sharing one stalled each other's downloads."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return remote.cache_dir, remote.litdata_cache_bytes
    return (remote.cache_dir / f"rank{dist.get_rank()}",
            remote.litdata_cache_bytes // dist.get_world_size())


def _collate_raw(batch: list[tuple[torch.Tensor, int]]) -> tuple[list[torch.Tensor],
                                                                  torch.Tensor]:
    return [b[0] for b in batch], torch.tensor([b[1] for b in batch], dtype=torch.long)


class ShardStream:
    """Batches of one split, epoch after epoch, with a resumable position."""

    def __init__(self, split_dir: Path, split: str, view: View, *, batch_size: int,
                 workers: int, seed: int = 0, shuffle: bool | None = None,
                 drop_last: bool | None = None, remote: RemoteSplit | None = None,
                 dataset: type[ShardDataset] = ShardDataset,
                 collate_fn: Callable[[list[Any]], Any] | None = None) -> None:
        if remote is None:
            self.samples = check_shards(split_dir, split)
        else:
            self.samples = indexed_samples(split_dir, split)
            if why := missing_remote(split_dir, remote.url):
                raise DataError(f"{CORRUPT} {why} (split {split!r}): run the pack stage again")
        self.split = split
        shuffle = view.train if shuffle is None else shuffle
        self.dataset = dataset(split_dir, split, view, seed=seed, shuffle=shuffle,
                               remote=remote)
        collate_fn = _collate_raw if view.raw else collate_fn
        kwargs: dict[str, Any] = {"collate_fn": collate_fn} if collate_fn else {}
        if workers:
            kwargs["persistent_workers"] = False
        self.loader = StreamingDataLoader(
            self.dataset, batch_size=batch_size, num_workers=workers,
            drop_last=view.train if drop_last is None else drop_last, **kwargs)

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return len(self.loader)

    def epoch(self, limit: int | None = None) -> Iterator[tuple[Any, torch.Tensor]]:
        """The next epoch's batches (the rest of it after `load_state_dict`), at most `limit`
        of them. Once they are read the epoch is over, however many were: LitData would
        otherwise start the next epoch at the restored position again, until one epoch
        reads its loader to the end."""
        try:
            yield from islice(self.loader, limit)
        except Exception as e:  # a worker's DataError arrives wrapped, several lines long
            for marker in (CORRUPT, LATE):
                line = next((ln.strip() for ln in str(e).splitlines() if marker in ln), None)
                if line is not None:
                    raise DataError(line[line.index(marker):]) from None
            raise
        self.loader.restore = False

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)

    def start_after(self, epochs_done: int) -> None:
        """Resume at an epoch boundary: the next `epoch()` is number `epochs_done + 1`."""
        self.loader.current_epoch = epochs_done
        self.loader.restore = False

    def close(self) -> None:
        """Stop the stream's downloads and remove the shards it cached from S3. A stream left
        part-read (the train stage's statistics sample) would otherwise keep what it read
        ahead in the cache while the next stream fills the whole cap again (BENCHMARKS, "S3
        streaming under DDP"). In-process streams only (`workers=0`): a worker's reader ends
        with its process."""
        reader = getattr(self.dataset.cache, "_reader", None)  # LitData's, made by the epoch
        thread = getattr(reader, "_prepare_thread", None)
        if thread is not None and thread.is_alive():
            thread.force_stop()
            thread.join(timeout=60)
        if self.dataset.s3_cache is not None:  # the shards, their locks and use counts: a
            for path in self.dataset.s3_cache.glob("chunk-*"):  # count left would pin its
                path.unlink(missing_ok=True)  # shard in the next stream's cache for good
