"""A split's images read from its shards on demand (issue #18: every consumer streams).

`SplitImages` stands where the tensor cache's uint8 N×C×S×S `<split>_x` stands for evaluate,
compress and register, without ever holding the split: a slice read in order (what batched
inference does: `x[0:b]`, `x[b:2b]`, ...) comes from the next batches of an evaluation
stream, and a list of indices (a calibration subset, the mistakes to plot) is gathered in one
pass. Memory: one stream batch plus what was asked for. The labels each batch carries are
checked against the cache's, so shards that no longer match the cache stop the stage.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from visionflow.core.errors import DataError
from visionflow.data.stream import ShardStream


class SplitImages:
    """uint8 N×C×S×S images of one split, decoded when read (see the module doc)."""

    dtype = torch.uint8

    def __init__(self, open_stream: Callable[[], ShardStream], labels: torch.Tensor,
                 channels: int, size: int, split: str) -> None:
        self._open, self.labels, self.split = open_stream, labels, split
        self.shape = torch.Size((len(labels), channels, size, size))
        self._batches: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._pos = 0  # index of the first image in `_buf`
        self._buf = torch.zeros(0, channels, size, size, dtype=torch.uint8)
        self.passes = 0  # streams opened (a test reads it)
        self.peak_images = 0  # the most images held at once (`_buf`), a test reads it

    def __len__(self) -> int:
        return self.shape[0]

    def _next(self) -> bool:
        """Move `_buf` on to the next batch; False at the end of the split."""
        assert self._batches is not None
        self._pos += len(self._buf)
        try:
            x, y = next(self._batches)
        except StopIteration:
            self._buf = self._buf[:0]
            return False
        if not torch.equal(y, self.labels[self._pos:self._pos + len(y)]):
            raise DataError(f"the {self.split} shards do not match the packed data: run the "
                            "pack stage again")
        self._buf = x
        self.peak_images = max(self.peak_images, len(x))
        return True

    def _restart(self) -> None:
        self._batches = iter(self._open().epoch())
        self.passes += 1
        self._pos, self._buf = 0, self._buf[:0]

    def _range(self, start: int, stop: int) -> torch.Tensor:
        if self._batches is None or start < self._pos:
            self._restart()
        out = []
        while start < stop:
            end = self._pos + len(self._buf)
            if start < end:
                part = self._buf[start - self._pos:stop - self._pos]
                out.append(part)
                start += len(part)
            elif not self._next():
                break
        return torch.cat(out) if out else self._buf[:0]

    def gather(self, indices: Sequence[int]) -> torch.Tensor:
        """The images at `indices`, in that order, from one pass over the split."""
        want: dict[int, list[int]] = {}
        for k, i in enumerate(indices):
            want.setdefault(int(i), []).append(k)
        out = torch.zeros(len(indices), *self.shape[1:], dtype=torch.uint8)
        self._restart()
        left = len(want)
        while left and self._next():
            for i in range(self._pos, self._pos + len(self._buf)):
                for k in want.get(i, ()):
                    out[k] = self._buf[i - self._pos]
                left -= i in want
        self._batches = None  # the next slice starts a new pass
        return out

    def __getitem__(self, key: Any) -> torch.Tensor:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                return self.gather(range(start, stop, step))
            return self._range(start, stop)
        if isinstance(key, int):
            return self.gather([key])[0]
        return self.gather(torch.as_tensor(key).reshape(-1).tolist())
