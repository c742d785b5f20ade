"""The segmentation pairs a stage reads after `pack` (#19): ONE adapter for both storages.

- `segmentation_pack(layout)`: the pack stage's record (`packed.pt`): classes, each split's
  paths, mask paths and pair sha256 in the stored order, and in tensor mode the pixels.
- `segmentation_pairs(params, layout, split)`: (C x H x W uint8 image, H x W int64 mask), one
  at a time, in that order: from the tensors, or streamed from the split's shards (local, or
  S3 through the capped cache, `data.shard_cache_bytes`) in this process.
- `train_batches(params, layout, pack, device)`: shards mode's train split, epoch by epoch,
  as uint8 batches at `segmentation.image_size`, shuffled, decoded and resized in
  `data.workers` DataLoader workers, with a resumable position (tensor mode trains on the
  pack's tensors).

Tensor mode holds what `data.storage_budget_bytes` allows; shards mode holds a few batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from typing import Any

import torch
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image

from visionflow.core.config import Params
from visionflow.core.errors import DataError
from visionflow.core.layout import Layout
from visionflow.data.feed import is_shards, shard_remote
from visionflow.data.packed import load_packed
from visionflow.data.segmentation_shards import resize_train_pair
from visionflow.data.stream import ShardDataset, ShardStream, View

SPLITS = ("train", "val", "test")


class PairShards(ShardDataset):
    """A split's pair shards (`data.segmentation_shards`): (3 x H x W uint8 image, H x W
    uint8 mask) items; for training resized to `view.size` (image bilinear and antialiased,
    mask nearest: what the tensor path stores), for evaluation at their stored size."""

    def sample(self, item: dict[str, Any], number: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = decode_image(torch.frombuffer(bytearray(item["image"]), dtype=torch.uint8),
                             mode=ImageReadMode.RGB)
        mask = decode_image(torch.frombuffer(bytearray(item["mask"]), dtype=torch.uint8),
                            mode=ImageReadMode.UNCHANGED)[0]
        if self.view.train:
            return resize_train_pair(image, mask, self.view.size)
        return image, mask


def one_pair(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor,
                                                                     torch.Tensor]:
    """Evaluation streams batch one pair (each at its own size)."""
    (pair,) = batch
    return pair


def segmentation_pack(layout: Layout) -> dict[str, Any]:
    if not layout.packed.is_file():
        raise DataError(f"{layout.packed}: no packed data: run validate and pack first")
    blob = load_packed(layout.packed)
    if blob.get("task") != "segmentation":
        raise DataError(f"{layout.packed}: packed for {blob.get('task', 'classification')}, "
                        f"not segmentation: run pack again")
    return blob


def pair_stream(params: Params, layout: Layout, pack: dict[str, Any], split: str, *,
                train: bool, drop_last: bool = False) -> ShardStream:
    s, d = params.segmentation, params.data
    view = View(s.image_size, s.image_size, 3, train=train)
    return ShardStream(layout.split_shards(split), split, view,
                       batch_size=s.batch_size if train else 1,
                       workers=d.workers if train else 0, seed=params.seed, shuffle=train,
                       drop_last=drop_last, dataset=PairShards,
                       collate_fn=None if train else one_pair,
                       remote=shard_remote(layout, pack, split, d.shard_cache_bytes))


def segmentation_pairs(params: Params, layout: Layout, split: str, limit: int | None = None,
                       pack: dict[str, Any] | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """(C x H x W uint8 image, H x W int64 mask) of `split`, in the packed order; at most
    `limit` pairs (None: all)."""
    if split not in SPLITS:
        raise DataError(f"segmentation split {split!r}: choose one of {', '.join(SPLITS)}")
    pack = segmentation_pack(layout) if pack is None else pack
    if not pack[f"{split}_paths"]:
        raise DataError(f"{layout.packed}: no segmentation pairs in the {split} split")
    if not is_shards(pack):
        for image, mask in islice(zip(pack[f"{split}_x"], pack[f"{split}_masks"],
                                      strict=True), limit):
            yield image, mask.long()
        return
    stream = pair_stream(params, layout, pack, split, train=False)
    try:
        for image, mask in islice(stream.epoch(), limit):
            yield image, mask.long()
    finally:
        stream.close()


class ShardBatches:
    """Shards mode's train batches (`model.segmentation_fit.Batches`): epoch `number`'s
    (uint8 images, int64 masks) on `device`, `steps` of them; an epoch resumed after `done`
    batches goes on from the loader's saved position (`load_state_dict`)."""

    def __init__(self, stream: ShardStream, steps: int, device: torch.device) -> None:
        self.stream, self.steps, self.device = stream, steps, device
        self._restored = False

    def __call__(self, number: int, done: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        restored, self._restored = self._restored, False
        # a mid-epoch checkpoint holds every rank's position (its identity fixes the ranks)
        if done and not restored:
            raise ValueError(f"epoch {number} resumes after batch {done} without the "
                             "loader's saved position")
        if not done:
            self.stream.start_after(number - 1)  # that epoch's shuffle seeds
        for x, y in self.stream.epoch(self.steps - done):
            yield x.to(self.device, non_blocking=True), y.to(self.device,
                                                            non_blocking=True).long()

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)
        self._restored = True


def train_batches(params: Params, layout: Layout, pack: dict[str, Any],
                  device: torch.device, ranks: int = 1) -> ShardBatches:
    """Shards mode: the train split's batches, epoch by epoch (1, 2, ...: a resumed run
    starts at any, mid-epoch too). Under DDP (`ranks` > 1) each rank streams its part of the
    shards in whole batches, the same number on every rank (one more on one rank would leave
    the others waiting for it). Tensor mode trains on `pack`'s tensors
    (`model.segmentation_fit.fit_segmenter`)."""
    n, batch = len(pack["train_paths"]), params.segmentation.batch_size
    lone = n % batch == 1 and n > 1  # a last batch of one pair is left out, as in tensor mode
    stream = pair_stream(params, layout, pack, "train", train=True, drop_last=ranks > 1 or lone)
    return ShardBatches(stream, len(stream), device)
