"""`vflow predict`: batch prediction with a registered model over files, folders or archives.

The model is loaded with `mlflow.pyfunc.load_model` (any `models:/`, `runs:/` or local
URI); the network runs batched, on CUDA when present. Inputs are decoded by
`visionflow.data.images` (the same normalisation as training) and archives are extracted
with its safe extractor into a temporary folder. Unreadable files get a row with an
`error` and do not stop the run. Output: CSV (one column pair per top-k rank) or JSON.
A segmentation model writes one PNG mask per image instead (`predict_masks`); `task`
(`--task`) names the task the caller expects: a model of the other task is a one-line
error naming its version.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from visionflow.core.errors import ConfigError, DataError
from visionflow.core.files import walk_files, write_text
from visionflow.data.archive import ARCHIVE_SUFFIXES
from visionflow.data.images import decode_eval
from visionflow.data.scan import IGNORED_NAMES
from visionflow.data.source import resolve_source
from visionflow.mlops import registry
from visionflow.mlops.predict_masks import mask_folder, write_masks

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


@dataclass
class PredictSummary:
    model_uri: str
    out: str
    images: int
    failed: int
    device: str
    classes: int
    errors: list[str] = field(default_factory=list)


def _hidden(rel: Path) -> bool:

    return any(part.startswith(".") or part.lower() in IGNORED_NAMES for part in rel.parts)


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in walk_files(folder)
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not _hidden(p.relative_to(folder)))


def _is_archive(path: Path) -> bool:

    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def collect_inputs(paths: Iterable[str | Path], extract_root: Path) -> list[tuple[str, Path]]:
    """(name shown in the output, file to read) for every image under `paths`.

    Folders are searched recursively for image files; archives are extracted safely
    (no absolute paths, `..`, links out or device files) under `extract_root` and named
    `archive.tar.gz:inner/path.png`; plain files are taken as given.
    """

    found: list[tuple[str, Path]] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise DataError(f"{p}: no such file or folder")
        if p.is_dir():
            found += [(str(f), f) for f in _images_under(p)]
        elif _is_archive(p):
            root = resolve_source(p, extract_root)
            found += [(f"{p}:{f.relative_to(root).as_posix()}", f) for f in _images_under(root)]
        else:
            found.append((str(p), p))
    if not found:
        raise DataError(f"no images found in {', '.join(str(p) for p in paths)}")
    return found


def pick_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name!r}: choose auto, cpu or cuda")
    return name


def load_model(model_uri: str, root: str | Path = "."):
    """The pyfunc and its ImageClassifierModel (for batched tensor prediction)."""

    registry.client_for(root)  # points models:/ URIs at the project's store
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        pyfunc = mlflow.pyfunc.load_model(model_uri)
    except (MlflowException, OSError) as err:
        msg = " ".join(str(err).split())[:300]
        named = model_uri.startswith("models:/") and "Registered Model with name" in msg
        hint = (registry.held_instead(mlflow.MlflowClient(), "--model models:/NAME@champion")
                if named else "")
        raise DataError(f"--model {model_uri}: cannot load ({msg}){hint}") from None
    impl = pyfunc.unwrap_python_model()
    if not hasattr(impl, "probabilities") and not hasattr(impl, "masks"):
        raise DataError(f"--model {model_uri}: not a visionflow image model")
    return pyfunc, impl


def run_predict(model_uri: str, paths: list[str | Path], out: str | Path,
                fmt: str | None = None, batch_size: int = 256, topk: int | None = None,
                device: str = "auto", root: str | Path = ".",
                progress: bool = True, task: str | None = None) -> PredictSummary:


    out_s = str(out)
    fmt = (fmt or ("json" if out_s.lower().endswith(".json") else "csv")).lower()
    if fmt not in ("csv", "json"):
        raise ConfigError(f"--format {fmt!r}: choose csv or json")
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: must be >= 1")
    dev = pick_device(device)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="vflow-predict-") as tmp:
        inputs = collect_inputs(paths, Path(tmp))  # bad paths fail before the model loads
        _, impl = load_model(model_uri, root)
        model_task = getattr(impl, "task", "classification")
        if task is not None and task != model_task:
            raise ConfigError(f"--task {task}: {_which(model_uri, root)} is a {model_task} "
                              f"model, not a {task} model")
        impl.to(dev)
        arch = impl.arch
        if model_task == "segmentation":
            folder = mask_folder(out)
            bar = _bar(len(inputs), progress)
            try:
                masks = write_masks(impl, inputs, folder, batch_size, bar)
            finally:
                bar(None)
            failed = [r for r in masks if r["error"]]
            return PredictSummary(model_uri, str(folder), len(masks) - len(failed),
                                  len(failed), dev, arch.num_classes,
                                  [r["error"] for r in failed[:5]])
        k = max(1, min(topk or impl.topk, arch.num_classes))
        bar = _bar(len(inputs), progress)
        try:
            for start in range(0, len(inputs), batch_size):
                chunk = inputs[start:start + batch_size]
                arrays, names = [], []
                for name, path in chunk:
                    try:
                        arrays.append(decode_eval(path, arch.image_size, arch.in_channels,
                                                  getattr(arch, "resize_size", None)))
                        names.append(name)
                    except DataError as err:
                        rows.append({"path": name, "label": "", "score": None, "topk": [],
                                     "error": str(err)})
                if arrays:
                    probs = impl.probabilities(np.stack(arrays), batch_size)
                    top_p, top_i = probs.topk(k, dim=1)
                    for name, ii, pp in zip(names, top_i.tolist(), top_p.tolist(), strict=True):
                        rows.append({
                            "path": name, "label": arch.classes[ii[0]], "score": round(pp[0], 6),
                            "topk": [{"label": arch.classes[i], "probability": round(p, 6)}
                                     for i, p in zip(ii, pp, strict=True)],
                            "error": "",
                        })
                bar(len(chunk))
        finally:
            bar(None)

    order = {name: i for i, (name, _) in enumerate(inputs)}
    rows.sort(key=lambda r: order[r["path"]])
    text = _as_json(rows) if fmt == "json" else _as_csv(rows, k)
    if out_s == "-":
        print(text, end="")
    else:
        write_text(out_s, text)
    failed = [r for r in rows if r["error"]]
    return PredictSummary(model_uri, out_s, len(rows) - len(failed), len(failed), dev,
                          arch.num_classes, [r["error"] for r in failed[:5]])


def _which(model_uri: str, root: str | Path) -> str:
    """`version 3 of 'name'` for a `models:/name@alias` or `models:/name/3` URI (else the
    URI itself)."""
    if not model_uri.startswith("models:/"):
        return model_uri
    ref = model_uri.removeprefix("models:/")
    name, sep, alias = ref.partition("@")
    if not sep:
        name, _, alias = ref.rpartition("/")
    try:
        version = registry.resolve(registry.client_for(root), name, alias)
    except Exception:  # noqa: BLE001 (the URI is still a fine name)
        return model_uri
    return f"version {version} of '{name}' ({model_uri})"


def _as_json(rows: list[dict[str, Any]]) -> str:
    return json.dumps(rows, indent=2) + "\n"


def _as_csv(rows: list[dict[str, Any]], k: int) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "label", "score",
                *[f"{c}_{r}" for r in range(1, k + 1) for c in ("label", "prob")], "error"])
    for row in rows:
        ranks = [v for t in row["topk"] for v in (t["label"], f"{t['probability']:.6f}")]
        ranks += [""] * (2 * k - len(ranks))
        score = "" if row["score"] is None else f"{row['score']:.6f}"
        w.writerow([row["path"], row["label"], score, *ranks, row["error"]])
    return buf.getvalue()


def _bar(total: int, enabled: bool):
    """A rich progress bar on stderr; returns advance(n) (None closes it)."""
    if not enabled:
        return lambda n: None
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    progress = Progress(TextColumn("predict"), BarColumn(), MofNCompleteColumn(),
                        TimeRemainingColumn(), console=Console(stderr=True))
    task = progress.add_task("predict", total=total)
    progress.start()

    def advance(n: int | None) -> None:
        if n is None:
            progress.stop()
        else:
            progress.update(task, advance=n)

    return advance
