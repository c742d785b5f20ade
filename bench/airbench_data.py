"""The CIFAR-10 JPEG archive as the public record script's loader reads it (issue #20).

airbench94_muon.py's `CifarLoader(path)` loads `path/train.pt` and `path/test.pt`, each
`{"images": N×32×32×3 uint8, "labels": N int64, "classes": [names]}`. Written from the same
decoded tensors our own runs train on (`cifar_data.load_cifar`), so both sides see the same
pixels and labels (classes sorted by name, as our decoder numbers them).

    python bench/airbench_data.py ../shared/datasets/cifar10-jpeg.tar.gz /tmp/airbench/cifar10
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from cifar_data import load_cifar  # noqa: E402


def write_airbench(data: dict, folder: str | Path) -> dict[str, int]:
    """`train.pt` / `test.pt` in `folder` (atomic writes); returns the image counts."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in ("train", "test"):
        x, y = data[f"{split}_x"], data[f"{split}_y"]
        blob = {"images": x.permute(0, 2, 3, 1).contiguous(), "labels": y.long(),
                "classes": list(data["classes"])}
        tmp = folder / f".{split}.pt.tmp"
        torch.save(blob, tmp)
        os.replace(tmp, folder / f"{split}.pt")
        counts[split] = len(y)
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("archive")
    ap.add_argument("folder", help="where train.pt and test.pt go (the record's `cifar10/`)")
    ap.add_argument("--limit", type=int, default=None, help="images per split (dry runs)")
    a = ap.parse_args()
    print(write_airbench(load_cifar(a.archive, limit=a.limit), a.folder))


if __name__ == "__main__":
    main()
