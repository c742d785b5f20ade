"""Logging models to MLflow "from code" (nothing pickled) and registering them as versions:
the trained classifier (`pyfunc_classifier_entry.py`) and the compressed copy
(`pyfunc_compact_entry.py`), both with the same signature, input example and pinned
requirements."""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
import threading
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import LoggedModelOutput
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from PIL import Image

from visionflow.core.config import Params
from visionflow.core.files import write_text
from visionflow.core.layout import Layout
from visionflow.mlops import tracking
from visionflow.mlops.datasets import dataset, log_datasets
from visionflow.mlops.pyfunc_classifier import PIP_REQUIREMENTS, WEIGHTS
from visionflow.mlops.pyfunc_compact import ONNX_ARTIFACT
from visionflow.mlops.registry import TEST_PREFIX
from visionflow.model.classifier import load_classifier
from visionflow.model.metrics import capped_topk

HERE = Path(__file__).parent
PACKAGE = HERE.parent  # the visionflow package: the models' code path
COMPACT_ARTIFACT = "compact_model"
TRAIN_HASHES = "train_hashes-v{version}.json"


DESCRIPTION_HEADS = {"classification": "Image classifier trained by visionflow.",
                     "segmentation": "Semantic segmenter trained by visionflow."}
BUDGETS = {"classification": "compress.max_top1_drop", "segmentation": "compress.max_miou_drop"}


def describe_registered_model(client: Any, name: str, alias: str,
                              task: str = "classification") -> None:
    """The registered model's description: what each alias means (kept when a person wrote
    their own)."""
    rm = client.get_registered_model(name)
    text = "\n".join([
        f"{DESCRIPTION_HEADS[task]} Each version's description is its model card (data, test "
        "metrics, lineage, gate decision, usage); its metrics are its own logged model's; "
        "tags starting `lineage.` say where it came from, `gate_` why it was (not) promoted.",
        "",
        "Aliases:",
        f"- `{alias}`: the serving model, moved only by the champion gate (or by hand with "
        "`vflow models promote/rollback`, recorded with who and why);",
        "- `previous`: the version the champion replaced (what `vflow models rollback` "
        "goes back to);",
        "- `compact`: a compressed copy (ONNX, CPU) of the champion, registered as its own "
        f"version with its own test metrics, within `{BUDGETS[task]}` of its parent.",
        "",
        f"Browse: `vflow models list`; serve: `mlflow models serve -m models:/{name}@{alias}` "
        f"(or `@compact`).",
    ])
    if not rm.description or (rm.description.startswith(tuple(DESCRIPTION_HEADS.values()))
                              and rm.description != text):
        client.update_registered_model(name, description=text)


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
    return log_own_model("model", lambda model_id: mlflow.pyfunc.log_model(
        name="model",
        python_model=str(HERE / "pyfunc_classifier_entry.py"),
        artifacts={WEIGHTS: str(layout.model)},
        code_paths=[str(PACKAGE)],
        signature=signature,
        input_example=example,
        model_config={"topk": topk, "tta": bool(params and params.evaluate.tta),
                      **serving_limits(params)},
        pip_requirements=PIP_REQUIREMENTS,
        registered_model_name=model_name,
        model_id=model_id,
    ))


def log_own_model(name: str, log: Callable[[str], Any]) -> Any:
    """Log a model into the active run so that it carries only the metrics logged on it.

    MLflow copies a run's step-0 metrics (here the test, compress, calibration and system
    metrics) onto every model logged inside the run. So: create the logged model (source
    run = this run, the run's params), write it with `log(model_id)` from a thread that has
    no active run (nothing copied), then record it as the run's output."""
    run = mlflow.active_run()
    info = mlflow.get_run(run.info.run_id)
    model = mlflow.initialize_logged_model(name=name, source_run_id=run.info.run_id,
                                           experiment_id=run.info.experiment_id,
                                           params=dict(info.data.params))
    out: dict[str, Any] = {}

    def work() -> None:
        try:
            out["info"] = log(model.model_id)
        except BaseException as err:  # noqa: BLE001 (raised in the caller's thread)
            out["error"] = err

    thread = threading.Thread(target=work, name=f"log-{name}")
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    MlflowClient().log_outputs(run.info.run_id, [LoggedModelOutput(model.model_id, step=0)])
    return out["info"]


def log_model_metrics(metrics: dict[str, float], model_id: str, params: Params,
                      layout: Layout, extra: dict[str, float] | None = None) -> None:
    """A logged model's own metrics (what its version page and `search_logged_models`
    show), measured on the test split; the datasets it trained and was evaluated on."""
    log_datasets(params, layout, model_id)  # first: a metric's dataset is logged untagged
    test = dataset(params, layout, "test")
    # a model logged into a run already carries the run's step-0 metrics: log only what
    # it lacks (or has with another value), so its page lists each metric once
    have = {m.key: m.value for m in mlflow.get_logged_model(model_id).metrics or []}
    own = {TEST_PREFIX + k: float(v) for k, v in metrics.items()}
    own = {k: v for k, v in own.items() if k not in have or abs(have[k] - v) > 1e-9}
    if own:
        mlflow.log_metrics(own, model_id=model_id, dataset=test)
    if extra:
        mlflow.log_metrics({k: float(v) for k, v in extra.items()}, model_id=model_id)


def sample_image(cache: dict[str, Any], arch: Any, layout: Layout,
                 dataset_root: str) -> tuple[str, str] | None:
    """(the first test image's path, relative to the project when inside it; its class).
    `dataset_root`: where validate found the images (validation.json's `dataset_root`)."""
    paths = cache.get("test_paths") or []
    if not len(paths):
        return None
    path = Path(str(paths[0]))
    if not path.is_absolute():  # recorded relative to the dataset's root
        path = Path(dataset_root or layout.root) / path
    with contextlib.suppress(ValueError):
        path = path.resolve().relative_to(layout.root.resolve())
    return str(path), str(arch.classes[int(cache["test_y"][0])])


def serving_limits(params: Params | None) -> dict[str, int]:
    """What one served image may be: the data gate's file-size and pixel limits."""
    if params is None:
        return {}
    return {"max_image_bytes": params.validate_.max_bytes,
            "max_image_pixels": params.validate_.max_pixels}


def record_decision(layout: Layout, model_name: str, version: str, decision: Any,
                    report: str, card: str) -> None:
    """The gate's report and the model card: the stage's files, artifacts and tags of its run,
    and the run's outcome line."""
    write_text(layout.gate_report, report)
    write_text(layout.model_card, card)
    mlflow.log_artifact(str(layout.gate_report), "register")
    mlflow.log_artifact(str(layout.model_card), "register")
    mlflow.set_tags({"registered_version": version, "gate_decision": decision.label,
                     "gate_reason": decision.reason[:5000]})
    tracking.add_outcome(f"**Outcome:** registered {model_name} v{version}, "
                         f"{decision.label}: {decision.reason}")


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
        python_model=str(HERE / "pyfunc_compact_entry.py"),
        artifacts={ONNX_ARTIFACT: str(onnx_path)},
        code_paths=[str(PACKAGE)],
        signature=signature,
        input_example=example,
        model_config={"topk": topk, "tta": bool(params.evaluate.tta), "arch": asdict(arch),
                      **serving_limits(params)},
        pip_requirements=[*PIP_REQUIREMENTS, "onnxruntime"],
        registered_model_name=model_name,
    )
