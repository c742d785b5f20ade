"""Stage 6, register: log the model to MLflow, register a version, gate the `champion` alias.

The challenger and the current champion are scored on the same test split by the same
code (`evaluate.model_logits` + `evaluate.score_logits`); `gate.decide` promotes only when
the floor, the minimum gain and (optionally) McNemar's exact test all hold, or when there
is no champion yet. Everything happens under one lock per store (`registry.registry_lock`),
so concurrent registrations see each other's result. Each version gets a model card as
its description, provenance tags, a signature and an input example; the gate report is
printed, written to `outputs/register/gate_report.md` and logged to the MLflow run.
"""

from __future__ import annotations

import csv
import hashlib
import json
import platform
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from visionflow.config import Params
from visionflow.files import write_text
from visionflow.layout import Layout
from visionflow.mlops import tracking
from visionflow.mlops.gate import Decision, GateConfig, decide


@dataclass
class Registration:
    model_name: str
    version: str
    alias: str | None
    decision: Decision
    run_id: str
    ui_command: str
    compact: dict[str, Any] | None = None  # the `compact` version, when one was registered


def version_logits(client: Any, name: str, version: str, cache: dict,
                   params: Params) -> tuple[Any | None, str]:
    """Test-split logits of a registered version (None and why, if it cannot be scored)."""
    import mlflow

    from visionflow.model.classifier import load_classifier
    from visionflow.model.inference import model_logits, pick_device

    from_uri = f"models:/{name}/{version}"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=from_uri, dst_path=tmp))
        except Exception as err:  # artifacts gone (deleted store folder, ...)
            if why := tracking.artifact_store_error(err):  # an outage: never "no champion"
                raise tracking.ArtifactStoreUnavailable(why) from None
            return None, f"champion v{version} artifacts cannot be read ({type(err).__name__})"
        weights = next(local.rglob("model.pt"), None)
        if weights is None:
            return None, f"champion v{version} has no weights artifact"
        device = pick_device(params.train.device)
        model, arch = load_classifier(weights, device)
    if arch.classes != cache["classes"]:
        return None, f"champion v{version} was trained on other classes"
    if (arch.image_size, arch.in_channels) != (cache["image_size"], cache["channels"]):
        return None, f"champion v{version} takes other inputs ({arch.image_size}px)"
    cfg = params.evaluate
    return model_logits(model, cache["test_x"], cfg.batch_size, device, cfg.tta,
                        arch.temperature), ""


def score_version(client: Any, name: str, version: str, cache: dict,
                  params: Params) -> tuple[float | None, str]:
    """Top-1 of a registered version on this test split (None if it cannot be scored)."""
    logits, note = version_logits(client, name, version, cache, params)
    if logits is None:
        return None, note
    return float((logits.argmax(1) == cache["test_y"]).float().mean()), ""


def challenger_logits(layout: Layout, cache: dict, params: Params):
    from visionflow.model.classifier import load_classifier
    from visionflow.model.inference import model_logits, pick_device

    device = pick_device(params.train.device)
    model, arch = load_classifier(layout.model, device)
    cfg = params.evaluate
    logits = model_logits(model, cache["test_x"], cfg.batch_size, device, cfg.tta,
                          arch.temperature)
    return logits, model, arch


def current_champion(client: Any, name: str, alias: str) -> str | None:
    from visionflow.mlops.registry import current_alias

    return current_alias(client, name, alias)


def run(params: Params, layout: Layout) -> Registration:
    import mlflow
    from mlflow import MlflowClient

    from visionflow.data.cache import load_cache
    from visionflow.mlops import gate, registry
    from visionflow.model.metrics import headline, score_logits

    cfg = params.register_
    metrics = json.loads(layout.metrics.read_text())
    validation = json.loads(layout.validation.read_text())
    cache = load_cache(layout.cache)
    tags = version_tags(params, layout, validation, metrics)
    layout.mlruns.mkdir(exist_ok=True)
    target = cache["test_y"]

    with tracking.stage_run(layout) as run:
        uri = mlflow.get_tracking_uri()
        with registry.registry_lock(uri) as lock:
            client = MlflowClient()
            registry.abandon_interrupted(client, cfg.model_name, run.info.run_id)
            ch_logits, model, arch = challenger_logits(layout, cache, params)
            scores = score_logits(ch_logits, target, arch.classes, params.evaluate.topk,
                                  params.evaluate.calibration_bins)
            tags["metrics"] = json.dumps({k: round(v, 6) for k, v in headline(scores).items()})
            champ = current_champion(client, cfg.model_name, cfg.alias)
            champ_correct, note = None, ""
            if champ is not None:
                champ_logits, note = version_logits(client, cfg.model_name, champ, cache, params)
                if champ_logits is not None:
                    champ_correct = champ_logits.argmax(1) == target
            decision = decide(ch_logits.argmax(1) == target, champ_correct,
                              GateConfig.from_params(cfg),
                              champ if champ_correct is not None else None, note)

            try:
                info = log_pyfunc(layout, cfg.model_name, params)
            except Exception as err:
                if why := tracking.artifact_store_error(err):
                    raise tracking.ArtifactStoreUnavailable(why) from None
                raise
            version = str(info.registered_model_version)
            report = decision.markdown(cfg.model_name, version)
            card = model_card(cfg.model_name, version, params, layout, arch, model, scores,
                              validation, tags, decision, run)
            client.update_model_version(cfg.model_name, version, description=card)
            _describe_registered_model(client, cfg.model_name, cfg.alias)
            lock.check()  # still ours (a restarted database drops it): else retry it all
            alias = gate.apply(client, cfg.model_name, version, decision, cfg.alias, tags)
        write_text(layout.gate_report, report)
        write_text(layout.model_card, card)
        mlflow.log_artifact(str(layout.gate_report), "register")
        mlflow.log_artifact(str(layout.model_card), "register")
        mlflow.set_tags({"registered_version": version, "gate_decision": decision.label})
    print(report)

    reg = Registration(cfg.model_name, version, alias, decision, run.info.run_id,
                       tracking.ui_command(layout))
    if cfg.compact and alias:  # a compressed copy of the model that now serves
        from visionflow.mlops.compact import register_compact

        reg.compact = register_compact(params, layout, version)
    elif cfg.compact:
        print(f"compact: nothing registered (v{version} was not promoted)")
    from visionflow.files import write_json

    write_json(layout.registration, {**asdict(reg), "tags": tags})
    return reg


def tags_decision(d: Decision) -> str:
    return d.label


def _describe_registered_model(client: Any, name: str, alias: str) -> None:
    rm = client.get_registered_model(name)
    if not rm.description:
        client.update_registered_model(name, description=(
            f"Image classifier trained by visionflow. Alias `{alias}` marks the serving "
            f"model, `previous` the one it replaced. Each version's description is its "
            f"model card; tags hold provenance and the champion-gate decision. "
            f"Browse: `vflow models list`; serve: `mlflow models serve -m "
            f"models:/{name}@{alias}`."))


def signature_and_example(arch: Any, topk: int):
    import numpy as np
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    signature = ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema([ColSpec("string", "label"), ColSpec("double", "score"),
                        ColSpec("string", "topk")]),
        params=ParamSchema([ParamSpec("topk", "long", topk)]),
    )
    example = pd.DataFrame({"image": [_example_png(arch.image_size, arch.in_channels, np)]})
    return signature, example


def log_pyfunc(layout: Layout, model_name: str, params: Params | None = None):
    """Log the model 'from code' with its weights; register it as a new version."""
    import mlflow

    from visionflow.mlops import pyfunc as serving
    from visionflow.model.classifier import load_classifier
    from visionflow.model.metrics import capped_topk

    _, arch = load_classifier(layout.model)
    topk = max(capped_topk(params.evaluate.topk if params else [5], arch.num_classes))
    signature, example = signature_and_example(arch, topk)
    pkg = Path(serving.__file__).parent.parent  # the visionflow package
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=str(Path(serving.__file__).with_name("pyfunc_model.py")),
        artifacts={serving.WEIGHTS: str(layout.model)},
        code_paths=[str(pkg)],
        signature=signature,
        input_example=example,
        model_config={"topk": topk, "tta": bool(params and params.evaluate.tta)},
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


# --------------------------------------------------------------------------- provenance


def version_tags(params: Params, layout: Layout, validation: dict, metrics: dict) -> dict[str, str]:
    dump = json.dumps(params.dump(), sort_keys=True)
    return {
        "data_hash": validation.get("data_hash", ""),
        "dvc_data_md5": dvc_md5(layout.dvc_file("data")),
        "dvc_lock_hash": file_sha256(layout.dvc_lock),
        "git_commit": git_commit(layout.root),
        "params_hash": hashlib.sha256(dump.encode()).hexdigest()[:16],
        "params": dump[:5000],
        "top1": f"{metrics['top1']:.6f}",
        "model": params.train.model,
    }


def file_sha256(path: Path) -> str:
    """sha256[:16] of a file, '' when absent (dvc.lock before the first `dvc repro`)."""
    if not path.is_file():
        return ""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def dvc_md5(dvc_file: Path) -> str:
    if not dvc_file.is_file():
        return ""
    import yaml

    outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or [{}]
    return str(outs[0].get("md5", "")).removesuffix(".dir")  # DVC marks directories


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


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what `platform` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware() -> str:
    """This machine: CPU model and cores, GPU name when CUDA is there, torch version."""
    import os

    import torch

    parts = [f"{cpu_name()} ({os.cpu_count()} cores)"]
    if torch.cuda.is_available():
        parts.append(torch.cuda.get_device_name(0))
    parts.append(f"torch {torch.__version__}, {platform.system()} {platform.release()}")
    return "; ".join(parts)


def _training_summary(layout: Layout) -> dict[str, Any]:
    if not layout.history.is_file():
        return {}
    with layout.history.open() as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    last = rows[-1]
    return {
        "epochs": len(rows),
        "seconds": sum(float(r.get("seconds") or 0) for r in rows),
        "final_train_loss": float(last.get("train_loss") or 0),
        "final_val_top1": last.get("val_top1") or "",
        "peak_mem_gb": last.get("peak_mem_gb") or "",
    }


def _md_table(rows: list[tuple[str, Any]]) -> list[str]:
    out = ["| | |", "|---|---|"]
    out += [f"| {k} | {str(v).replace('|', '/')} |" for k, v in rows]
    return out


def model_card(name: str, version: str, params: Params, layout: Layout, arch: Any, model: Any,
               scores: dict[str, Any], validation: dict, tags: dict[str, str],
               decision: Decision, run: Any) -> str:
    """The version's description: what it is, what it was trained on, how good, provenance."""
    from visionflow.model.metrics import headline

    n_params = sum(p.numel() for p in model.parameters())
    counts = validation.get("counts") or {}
    split_sizes = _split_sizes(counts)
    train = _training_summary(layout)
    run_tags = dict(getattr(getattr(run, "data", None), "tags", {}) or {})
    p = params.dump()
    classes = ", ".join(arch.classes)
    lines = [
        f"# {name} v{version}: {arch.name}",
        "",
        f"**Gate: {decision.label}.** {decision.reason}",
        "",
        "## Model",
        *_md_table([
            ("architecture", f"{arch.name}, {n_params:,} parameters"),
            ("input", f"{arch.image_size}x{arch.image_size}, {arch.in_channels} channel(s), "
                      "image bytes or arrays (preprocessing inside)"),
            ("classes", f"{arch.num_classes}: {classes[:1500]}"),
            ("output", "label, score, top-k probabilities (JSON)"),
        ]),
        "",
        "## Data",
        *_md_table([
            ("data hash", tags.get("data_hash") or "-"),
            ("DVC data md5", tags.get("dvc_data_md5") or "-"),
            ("source", validation.get("source", params.data.source)),
            ("images", f"{validation.get('usable', '?')} usable of "
                       f"{validation.get('files', '?')} files"),
            ("splits", split_sizes or "-"),
        ]),
        "",
        "## Test metrics",
        "| metric | value |", "|---|---|",
        *[f"| {k} | {v:.4f} |" for k, v in headline(scores).items()],
        f"| test images | {scores['n']} |",
        "",
        "## Training",
        *_md_table([
            ("epochs", train.get("epochs", "-")),
            ("training time", f"{train['seconds']:.1f} s" if train else "-"),
            ("final train loss", f"{train['final_train_loss']:.4f}" if train else "-"),
            ("training device", run_tags.get("device", "-")),
            ("hardware (registering host)", hardware()),
            ("parent run", f"{run.info.run_id} (experiment {run.info.experiment_id})"),
            ("git commit", tags.get("git_commit") or "-"),
            ("dvc.lock hash", tags.get("dvc_lock_hash") or "-"),
            ("params hash", tags.get("params_hash")),
        ]),
        "",
        "## Params",
        "```yaml",
        *_yaml_lines({k: p[k] for k in ("seed", "data", "augment", "train", "evaluate",
                                        "register") if k in p}),
        "```",
        "",
        decision.markdown(name, version),
        "## Use",
        "```python",
        "import mlflow, pandas as pd",
        f'model = mlflow.pyfunc.load_model("models:/{name}/{version}")',
        'model.predict(pd.DataFrame({"image": [open("cat.png", "rb").read()]}))',
        "```",
    ]
    return "\n".join(lines) + "\n"


def _split_sizes(counts: Any) -> str:
    if not isinstance(counts, dict):
        return ""
    total: dict[str, int] = {}
    for key, value in counts.items():
        if isinstance(value, dict):  # {split: {class: n}} or {class: {split: n}}
            for k2, v2 in value.items():
                if isinstance(v2, int | float):
                    split = key if key in ("train", "val", "test") else k2
                    total[split] = total.get(split, 0) + int(v2)
        elif isinstance(value, int | float):
            total[key] = total.get(key, 0) + int(value)
    return ", ".join(f"{k} {v}" for k, v in total.items())


def _yaml_lines(obj: dict[str, Any]) -> list[str]:
    import yaml

    return yaml.safe_dump(obj, sort_keys=False, default_flow_style=None).splitlines()
