"""Logging segmentation models to MLflow "from code" (#19), for the register stage:

- `log_segmenter_pyfunc(model_path, model_name, params, model_id=...)`: the trained
  segmenter (`pyfunc_segmenter_entry.py`, weights as an artifact), registered as a new
  version of `model_name` when it is given;
- `log_compact_segmenter(onnx_path, arch, model_name, params)`: compress's chosen ONNX
  variant (`pyfunc_compact_segmenter_entry.py`);
- `tag_task(client, name, version, task)` and `version_task(mv)`: the `task` tag every
  version carries (a version without one predates #19: a classifier);
- `check_task(where, mv, want)`: the one-line error when a version of the other task is
  asked for.

Both models share one signature: an `image` column (binary) in; `mask` (base64 index PNG),
`height`, `width`, `classes` (JSON) out.
"""

from __future__ import annotations

import io
from dataclasses import asdict
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema
from PIL import Image

from visionflow.core.config import Params
from visionflow.core.errors import ConfigError
from visionflow.mlops.publish import COMPACT_ARTIFACT, HERE, PACKAGE, serving_limits
from visionflow.mlops.pyfunc_classifier import PIP_REQUIREMENTS, WEIGHTS
from visionflow.mlops.pyfunc_compact import ONNX_ARTIFACT
from visionflow.model.segmentation import TASK, SegArch, load_segmenter

TASK_TAG = "task"
CLASSIFICATION = "classification"


def segmentation_signature(channels: int = 3) -> tuple[ModelSignature, pd.DataFrame]:
    """The signature and an input example (a 29 x 37 PNG: any size is served)."""
    signature = ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema([ColSpec("string", "mask"), ColSpec("long", "height"),
                        ColSpec("long", "width"), ColSpec("string", "classes")]))
    yy, xx = np.mgrid[0:29, 0:37]
    arr = ((xx * 7 + yy * 3) % 255).astype(np.uint8)
    img = Image.fromarray(arr, "L").convert("RGB" if channels == 3 else "L")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return signature, pd.DataFrame({"image": [buf.getvalue()]})


def log_segmenter_pyfunc(model_path: Path, model_name: str | None = None,
                         params: Params | None = None, *, name: str = "model",
                         model_id: str | None = None) -> Any:
    """Log `model_path` (a `save_segmenter` file) as a pyfunc "from code" into the active
    run; register it as a new version of `model_name` when given. Returns the ModelInfo
    (`registered_model_version` when registered). `model_id`: for `log_own_model`."""
    _, arch = load_segmenter(model_path)  # a classifier's file fails here, one line
    signature, example = segmentation_signature(arch.in_channels)
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(HERE / "pyfunc_segmenter_entry.py"),
        artifacts={WEIGHTS: str(model_path)},
        code_paths=[str(PACKAGE)],
        signature=signature,
        input_example=example,
        model_config={"task": TASK, **serving_limits(params)},
        pip_requirements=PIP_REQUIREMENTS,
        registered_model_name=model_name,
        model_id=model_id,
    )


def log_compact_segmenter(onnx_path: Path, arch: SegArch, model_name: str | None,
                          params: Params | None = None) -> Any:
    """Log compress's ONNX segmentation variant as a pyfunc; register it when named."""
    signature, example = segmentation_signature(arch.in_channels)
    return mlflow.pyfunc.log_model(
        name=COMPACT_ARTIFACT,
        python_model=str(HERE / "pyfunc_compact_segmenter_entry.py"),
        artifacts={ONNX_ARTIFACT: str(onnx_path)},
        code_paths=[str(PACKAGE)],
        signature=signature,
        input_example=example,
        model_config={"task": TASK, "arch": asdict(arch), **serving_limits(params)},
        pip_requirements=[*PIP_REQUIREMENTS, "onnxruntime"],
        registered_model_name=model_name,
    )


def tag_task(client: Any, name: str, version: str | int, task: str) -> None:
    client.set_model_version_tag(name, str(version), TASK_TAG, task)


def version_task(mv: Any) -> str:
    """A registered version's task (its `task` tag; none: a classifier)."""
    return (getattr(mv, "tags", None) or {}).get(TASK_TAG, CLASSIFICATION)


def check_task(where: str, mv: Any, want: str) -> None:
    """`ConfigError` (one line, naming the version and its task) unless `mv` is a `want`
    model; `where` says who asked (e.g. "predict", "register")."""
    have = version_task(mv)
    if have != want:
        raise ConfigError(f"{where}: version {mv.version} of '{mv.name}' is a {have} model, "
                          f"not a {want} model")
