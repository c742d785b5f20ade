"""Logging models to MLflow "from code" (nothing pickled) and registering them as versions:
the trained classifier (`pyfunc_model.py`) and the compressed copy (`compact_pyfunc.py`),
both with the same signature, input example and pinned requirements."""

from __future__ import annotations

import io
import json
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from PIL import Image

from visionflow.config import Params
from visionflow.layout import Layout
from visionflow.mlops.compact_model import ONNX_ARTIFACT
from visionflow.mlops.pyfunc import PIP_REQUIREMENTS, WEIGHTS
from visionflow.model.classifier import load_classifier
from visionflow.model.metrics import capped_topk

HERE = Path(__file__).parent
PACKAGE = HERE.parent  # the visionflow package: the models' code path
COMPACT_ARTIFACT = "compact_model"
TRAIN_HASHES = "train_hashes-v{version}.json"


def describe_registered_model(client: Any, name: str, alias: str) -> None:
    rm = client.get_registered_model(name)
    if not rm.description:
        client.update_registered_model(name, description=(
            f"Image classifier trained by visionflow. Alias `{alias}` marks the serving "
            f"model, `previous` the one it replaced. Each version's description is its "
            f"model card; tags hold provenance and the champion-gate decision. "
            f"Browse: `vflow models list`; serve: `mlflow models serve -m "
            f"models:/{name}@{alias}`."))


def signature_and_example(arch: Any, topk: int):
    signature = ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema([ColSpec("string", "label"), ColSpec("double", "score"),
                        ColSpec("string", "topk")]),
        params=ParamSchema([ParamSpec("topk", "long", topk)]),
    )
    example = pd.DataFrame({"image": [_example_png(arch.image_size, arch.in_channels)]})
    return signature, example


def log_pyfunc(layout: Layout, model_name: str, params: Params | None = None):
    """Log the model 'from code' with its weights; register it as a new version."""
    _, arch = load_classifier(layout.model)
    topk = max(capped_topk(params.evaluate.topk if params else [5], arch.num_classes))
    signature, example = signature_and_example(arch, topk)
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=str(HERE / "pyfunc_model.py"),
        artifacts={WEIGHTS: str(layout.model)},
        code_paths=[str(PACKAGE)],
        signature=signature,
        input_example=example,
        model_config={"topk": topk, "tta": bool(params and params.evaluate.tta),
                      **serving_limits(params)},
        pip_requirements=PIP_REQUIREMENTS,
        registered_model_name=model_name,
    )


def serving_limits(params: Params | None) -> dict[str, int]:
    """What one served image may be: the data gate's file-size and pixel limits."""
    if params is None:
        return {}
    return {"max_image_bytes": params.validate_.max_bytes,
            "max_image_pixels": params.validate_.max_pixels}


def log_train_hashes(train: list[str], val: list[str], version: str) -> str:
    """Log the sha256 of the images a version trained and validated on as an artifact of
    the active run; return its URI (the version's `train_hashes` tag)."""
    name = TRAIN_HASHES.format(version=version)
    blob = {"version": str(version), "train": sorted(set(train)), "val": sorted(set(val))}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(json.dumps(blob, separators=(",", ":")))
        mlflow.log_artifact(str(path), "register")
    return f"runs:/{mlflow.active_run().info.run_id}/register/{name}"


def _example_png(size: int, channels: int) -> bytes:
    arr = (np.arange(size * size, dtype=np.uint8).reshape(size, size) * 7) % 255
    img = Image.fromarray(arr.astype(np.uint8), "L").convert("RGB" if channels == 3 else "L")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def log_compact(onnx_path: Path, arch: Any, model_name: str, params: Params):
    """Log the ONNX variant as a pyfunc "from code" and register a new version of
    `model_name`."""
    topk = max(capped_topk(params.evaluate.topk, arch.num_classes))
    signature, example = signature_and_example(arch, topk)
    return mlflow.pyfunc.log_model(
        name=COMPACT_ARTIFACT,
        python_model=str(HERE / "compact_pyfunc.py"),
        artifacts={ONNX_ARTIFACT: str(onnx_path)},
        code_paths=[str(PACKAGE)],
        signature=signature,
        input_example=example,
        model_config={"topk": topk, "tta": bool(params.evaluate.tta), "arch": asdict(arch),
                      **serving_limits(params)},
        pip_requirements=[*PIP_REQUIREMENTS, "onnxruntime"],
        registered_model_name=model_name,
    )
