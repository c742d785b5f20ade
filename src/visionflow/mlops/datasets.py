"""The data a run trained and was evaluated on, as MLflow datasets ("Datasets used" on the
run and model pages): name, digest = the data hash validate computed, source = the URL
`data.dvc` imports from (an S3 prefix) or the DVC-tracked path, and a profile with the image
counts per split and class.

The counts come from `outputs/validate/validation.json` (already aggregated): nothing here
reads an image."""

from __future__ import annotations

import json
import warnings
from typing import Any

import mlflow
from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.sources import LocalArtifactDatasetSource
from mlflow.entities import LoggedModelInput
from mlflow.types import ColSpec, Schema

from visionflow.core.config import Params
from visionflow.core.files import read_json
from visionflow.core.layout import Layout

TRAIN_CONTEXT = "training"
EVAL_CONTEXT = "evaluation"


class ImageDataset(MetaDataset):
    """A MetaDataset with a profile (image counts per split and class)."""

    def __init__(self, source: Any, name: str, digest: str, profile: dict[str, Any]):
        schema = Schema([ColSpec("binary", "image"), ColSpec("string", "label")])
        super().__init__(source=source, name=name, digest=digest, schema=schema)
        self._profile = profile

    @property
    def profile(self) -> dict[str, Any]:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self._profile, sort_keys=True)}


def data_source(params: Params, validation: dict[str, Any]) -> Any:
    """Where the data comes from: the S3 prefix (or URL) `data.dvc` imports it from, as
    validate recorded it, else `data.source` as DVC tracks it (its path in the project)."""
    origin = str(validation.get("data_origin") or "")
    if "://" in origin and " " not in origin:  # (`dvc import`'s origin is "<repo> <path>")
        from mlflow.data.dataset_source_registry import resolve_dataset_source

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "can be interpreted in multiple ways"
            try:
                return resolve_dataset_source(origin)
            except Exception:  # noqa: BLE001 (a scheme MLflow has no source type for)
                pass
    return LocalArtifactDatasetSource(str(params.data.source))


def _profile(validation: dict[str, Any], split: str | None) -> dict[str, Any]:
    counts = validation.get("counts") or {}
    if split is not None:
        counts = {split: counts.get(split) or {}}
    per_split = {s: sum(c.values()) for s, c in counts.items() if isinstance(c, dict)}
    return {"images": sum(per_split.values()), "splits": per_split,
            "classes": len(validation.get("classes") or []),
            "per_class": {s: c for s, c in counts.items() if isinstance(c, dict)}}


def dataset(params: Params, layout: Layout, split: str | None = None) -> ImageDataset | None:
    """The dataset record for the data validate saw (one `split` of it, or all); None when
    validate recorded no data hash."""
    validation = read_json(layout.validation, {}) or {}
    digest = str(validation.get("data_hash") or "")
    if not digest:
        return None
    base = str(params.data.source).rstrip("/").rsplit("/", 1)[-1] or "data"
    name = base if split is None else f"{base}-{split}"
    source = data_source(params, validation)
    return ImageDataset(source, name, digest, _profile(validation, split))


def log_datasets(params: Params, layout: Layout, model_id: str | None = None) -> None:
    """Log the training data (all splits, context `training`) and the test split (context
    `evaluation`) on the active run; with `model_id`, linked to that logged model too."""
    for split, context in ((None, TRAIN_CONTEXT), ("test", EVAL_CONTEXT)):
        ds = dataset(params, layout, split)
        if ds is None:
            return
        model = LoggedModelInput(model_id) if model_id else None
        mlflow.log_input(ds, context=context, model=model)


def log_test_dataset(params: Params, layout: Layout) -> ImageDataset | None:
    """Log the test split (context `evaluation`) on the active run and return it, for the
    metrics measured on it (log it before them: a metric's dataset is logged untagged)."""
    ds = dataset(params, layout, "test")
    if ds is not None:
        mlflow.log_input(ds, context=EVAL_CONTEXT)
    return ds
