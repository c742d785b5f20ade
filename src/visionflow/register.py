"""Stage 6, register: log the model to MLflow, register a version, gate the `champion` alias.

The challenger and the current champion are scored on the same test split by the same
code (`evaluate.score_logits`); the alias moves only when the challenger's top-1 beats
the champion's by at least `register.min_delta`, or when there is no champion yet.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from visionflow.atomic import write_json
from visionflow.config import Params
from visionflow.layout import Layout


@dataclass
class Decision:
    promote: bool
    reason: str
    challenger_top1: float
    champion_version: str | None = None
    champion_top1: float | None = None


@dataclass
class Registration:
    model_name: str
    version: str
    alias: str | None
    decision: Decision
    run_id: str
    ui_command: str


def decide(challenger: float, champion: float | None, min_delta: float,
           champion_version: str | None = None, note: str = "") -> Decision:
    if champion is None:
        return Decision(True, note or "no champion yet", challenger)
    gain = challenger - champion
    if gain > 0 and gain >= min_delta:
        reason = (f"top-1 {challenger:.4f} beats champion v{champion_version} {champion:.4f} "
                  f"(gain {gain:+.4f}, min_delta {min_delta})")
        return Decision(True, reason, challenger, champion_version, champion)
    reason = (f"top-1 {challenger:.4f} does not beat champion v{champion_version} "
              f"{champion:.4f} (gain {gain:+.4f}, min_delta {min_delta})")
    return Decision(False, reason, challenger, champion_version, champion)


def score_version(client: Any, name: str, version: str, cache: dict,
                  params: Params) -> tuple[float | None, str]:
    """Top-1 of a registered version on this test split (None if it cannot be scored)."""
    import mlflow

    from visionflow.classifier import load_classifier
    from visionflow.evaluate import score_logits
    from visionflow.train import pick_device, predict_logits

    mv = client.get_model_version(name, version)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}",
                                                         dst_path=tmp))
        weights = next(local.rglob("model.pt"), None)
        if weights is None:
            return None, f"champion v{mv.version} has no weights artifact"
        device = pick_device(params.train.device)
        model, arch = load_classifier(weights, device)
    if arch.classes != cache["classes"]:
        return None, f"champion v{version} was trained on other classes"
    logits = predict_logits(model, cache["test_x"], params.evaluate.batch_size, device)
    return score_logits(logits, cache["test_y"], arch.classes, [1])["top1"], ""


def current_champion(client: Any, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias).version
    except MlflowException:
        return None


def run_register(params: Params, layout: Layout) -> Registration:
    import mlflow
    from filelock import FileLock
    from mlflow import MlflowClient

    from visionflow import tracking
    from visionflow.augment import load_cache

    cfg = params.register_
    metrics = json.loads(layout.metrics.read_text())
    validation = json.loads(layout.validation.read_text())
    cache = load_cache(layout.cache)
    tags = version_tags(params, layout, validation, metrics)
    layout.root.joinpath("mlruns").mkdir(exist_ok=True)

    with tracking.stage_run(layout) as run, FileLock(str(layout.root / "mlruns" / ".register.lock")):
        client = MlflowClient()
        champ = current_champion(client, cfg.model_name, cfg.alias)
        champ_top1, note = (None, "")
        if champ is not None:
            champ_top1, note = score_version(client, cfg.model_name, champ, cache, params)
        decision = decide(metrics["top1"], champ_top1, cfg.min_delta,
                          champ if champ_top1 is not None else None, note)

        info = log_pyfunc(layout, cfg.model_name)
        version = str(info.registered_model_version)
        for k, v in {**tags, "gate_decision": "promoted" if decision.promote else "rejected",
                     "gate_reason": decision.reason}.items():
            client.set_model_version_tag(cfg.model_name, version, k, str(v))
        alias = None
        if decision.promote:
            if champ is not None:
                client.set_registered_model_alias(cfg.model_name, "previous", champ)
            client.set_registered_model_alias(cfg.model_name, cfg.alias, version)
            alias = cfg.alias
        mlflow.set_tags({"registered_version": version, "gate_decision": tags_decision(decision)})

    reg = Registration(cfg.model_name, version, alias, decision, run.info.run_id,
                       tracking.ui_command(layout))
    write_json(layout.registration, {**asdict(reg), "tags": tags})
    return reg


def tags_decision(d: Decision) -> str:
    return "promoted" if d.promote else "rejected"


def log_pyfunc(layout: Layout, model_name: str):
    """Log the model 'from code' with its weights; register it as a new version."""
    import mlflow
    import numpy as np
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    from visionflow import serving
    from visionflow.classifier import load_classifier

    _, arch = load_classifier(layout.model)
    signature = ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema([ColSpec("string", "label"), ColSpec("double", "score"),
                        ColSpec("string", "topk")]),
    )
    example = pd.DataFrame({"image": [_example_png(arch.image_size, arch.in_channels, np)]})
    pkg = Path(serving.__file__).parent
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=str(pkg / "pyfunc_model.py"),
        artifacts={serving.WEIGHTS: str(layout.model)},
        code_paths=[str(pkg)],
        signature=signature,
        input_example=example,
        pip_requirements=serving.PIP_REQUIREMENTS,
        registered_model_name=model_name,
    )


def _example_png(size: int, channels: int, np: Any) -> bytes:
    import io

    from PIL import Image

    arr = (np.arange(size * size, dtype=np.uint8).reshape(size, size) * 7) % 255
    img = Image.fromarray(arr.astype(np.uint8), "L").convert("RGB" if channels == 3 else "L")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def version_tags(params: Params, layout: Layout, validation: dict, metrics: dict) -> dict[str, str]:
    dump = json.dumps(params.dump(), sort_keys=True)
    return {
        "data_hash": validation.get("data_hash", ""),
        "dvc_data_md5": dvc_md5(layout.root / "data.dvc"),
        "git_commit": git_commit(layout.root),
        "params_hash": hashlib.sha256(dump.encode()).hexdigest()[:16],
        "params": dump[:5000],
        "top1": f"{metrics['top1']:.6f}",
        "model": params.train.model,
    }


def dvc_md5(dvc_file: Path) -> str:
    if not dvc_file.is_file():
        return ""
    import yaml

    outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or [{}]
    return str(outs[0].get("md5", ""))


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    if out.returncode != 0:
        return ""
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           capture_output=True, text=True).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")
