"""`vflow predict` with a segmentation model (#19): one PNG mask per input image.

Each mask is an index PNG (VOC palette, one class index per pixel) at the input's size,
written atomically into the output folder as `<stem>.png` (`<stem>-2.png`, ... when stems
repeat); `index.csv` there lists input, mask file, height, width, the classes present and
the error of an input that could not be read (it gets no mask and does not stop the run).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from visionflow.core.errors import ConfigError, DataError, one_line
from visionflow.core.files import write_csv, write_with
from visionflow.data.segmentation_masks import index_png_bytes
from visionflow.mlops.pyfunc_segmenter import image_to_hwc

INDEX_FILE = "index.csv"
INDEX_COLUMNS = ("path", "mask", "height", "width", "classes", "error")


def mask_folder(out: str | Path) -> Path:
    """Where the masks go: `out`, or `out` without its .csv / .json suffix (the default
    `--out predictions.csv` -> `predictions/`)."""
    out = Path(str(out))
    if str(out) == "-":
        raise ConfigError("--out -: a segmentation model writes PNG masks, give a folder")
    if out.suffix.lower() in (".csv", ".json"):
        out = out.with_suffix("")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder (masks are PNG files)")
    return out


def write_masks(impl: Any, inputs: list[tuple[str, Path]], out: Path, batch_size: int,
                advance: Callable[[int | None], None]) -> list[dict[str, Any]]:
    """Segment every input with `impl` (an `ImageSegmenterModel`); write the masks and
    `index.csv` into `out`; return the index rows (input order)."""
    out.mkdir(parents=True, exist_ok=True)
    classes, used = list(impl.arch.classes), set()
    rows: list[dict[str, Any]] = []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start:start + batch_size]
        images, names = [], []
        for name, path in chunk:
            try:
                images.append(image_to_hwc(path.read_bytes(), impl.arch.in_channels,
                                           impl.limits))
                names.append((name, path))
            except (DataError, ValueError, OSError) as err:
                rows.append({"path": name, "mask": "", "height": "", "width": "",
                             "classes": "", "error": f"{path}: {one_line(err)}"})
        for (name, path), mask in zip(names, impl.masks(images) if images else [],
                                      strict=True):
            file = _unique(path.stem, used)
            data = index_png_bytes(mask)
            write_with(out / file, lambda tmp, data=data: tmp.write_bytes(data))
            present = [classes[i] if i < len(classes) else str(i)
                       for i in sorted(set(mask.ravel().tolist()))]
            rows.append({"path": name, "mask": file, "height": mask.shape[0],
                         "width": mask.shape[1], "classes": json.dumps(present), "error": ""})
        advance(len(chunk))
    order = {name: i for i, (name, _) in enumerate(inputs)}
    rows.sort(key=lambda r: order[r["path"]])
    write_csv(out / INDEX_FILE, rows, header=INDEX_COLUMNS)
    return rows


def _unique(stem: str, used: set[str]) -> str:
    name, n = f"{stem}.png", 1
    while name.lower() in used or name == INDEX_FILE:
        n += 1
        name = f"{stem}-{n}.png"
    used.add(name.lower())
    return name
