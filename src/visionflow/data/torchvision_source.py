"""`data.source: torchvision:CIFAR10`: a torchvision dataset, downloaded once, as an ImageFolder.

torchvision downloads into `.cache/torchvision/` (needs the network the first time) and
checks what it fetched: CIFAR files are unpickled by torchvision only after their md5
matches the published one, and MNIST-style files are parsed as IDX, not unpickled. The
images are then written once as PNG `train/<class>/` and `test/<class>/` folders under
`.cache/sources/<name>/` (in a temporary folder renamed into place when complete), and
from there on the source is an ordinary folder: validate, the manifest and its row cache,
splits (val is carved from train) all work as for any other ImageFolder.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from visionflow.core.config import TORCHVISION_DATASETS as DATASETS
from visionflow.core.config import TORCHVISION_PREFIX as PREFIX
from visionflow.core.config import is_torchvision_source, unknown_torchvision_dataset
from visionflow.core.errors import DataError
from visionflow.core.layout import Layout

COMPLETE = ".complete"
__all__ = ["DATASETS", "PREFIX", "is_torchvision_source", "materialize", "folder"]


def dataset_name(source: str) -> str:
    if why := unknown_torchvision_dataset(source):
        raise DataError(f"data.source={source}: {why}")
    return source[len(PREFIX):]


def folder(source: str, layout: Layout) -> Path:
    """Where `materialize` writes the ImageFolder for `source` (nothing is downloaded)."""
    return layout.sources_cache / dataset_name(source)


def materialize(source: str, layout: Layout) -> Path:
    """The ImageFolder for `torchvision:<NAME>`, downloading and writing it on first use."""
    name = dataset_name(source)
    dest = folder(source, layout)
    if (dest / COMPLETE).is_file():
        return dest
    splits = {split: _load(source, name, layout.torchvision_cache, split == "train")
              for split in ("train", "test")}
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=dest.parent))
    try:
        for split, ds in splits.items():
            write_split(ds, tmp / split)
        (tmp / COMPLETE).write_text(source + "\n")
        shutil.rmtree(dest, ignore_errors=True)  # an incomplete earlier attempt
        try:
            tmp.rename(dest)
        except OSError:
            if not (dest / COMPLETE).is_file():  # else another process finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _load(source: str, name: str, root: Path, train: bool) -> Any:
    from torchvision import datasets

    try:
        return getattr(datasets, name)(str(root), train=train, download=True)
    except Exception as e:  # URLError, RuntimeError("... corrupted"), OSError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"data.source={source}: could not download {name} into {root} "
                        f"({first}); offline? point data.source at a folder or an "
                        "archive instead") from e


def write_split(dataset: Any, folder: Path) -> int:
    """Write every (PIL image, class index) of `dataset` as `folder/<class>/<index>.png`."""
    classes = [str(c).replace("/", "_") for c in dataset.classes]
    for c in classes:
        (folder / c).mkdir(parents=True, exist_ok=True)
    width = len(str(len(dataset)))
    for i in range(len(dataset)):
        img, label = dataset[i]
        img.save(folder / classes[int(label)] / f"{i:0{width}d}.png")
    return len(dataset)
