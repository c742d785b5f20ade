"""Stage 3, train: fit a registry CNN on the augment cache, GPU when present, else CPU.

The uint8 cache goes to the training device once (streamed from pinned host memory when
it does not fit); batches are indexed and augmented there. Writes `model.pt` (arch +
state dict), `history.csv` and `run.json`, and logs params and per-epoch metrics to
MLflow. A checkpoint after every epoch lets an interrupted run resume (`kill -9` loses at
most one epoch). `torchrun --nproc_per_node=N vflow stage train` runs the same code with
DDP: data sharded per rank, rank 0 alone logs and writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import torch
import torchvision
from torch import nn

from visionflow.config import Params
from visionflow.data.cache import load_cache
from visionflow.errors import ConfigError
from visionflow.files import read_json, write_csv
from visionflow.layout import Layout
from visionflow.mlops import tracking
from visionflow.model import engine
from visionflow.model.calibration import fit_temperature
from visionflow.model.classifier import Arch, build_classifier, channel_stats, save_classifier
from visionflow.model.fit import EpochEnd, FitRun, Recipe
from visionflow.model.inference import device_logits, pick_device


@dataclass
class TrainResult:
    model_path: Path
    epochs_run: int
    val_top1: float | None
    seconds: float
    images_per_s: float
    device: str


def config_hash(params: Params) -> str:
    keep = {k: params.dump()[k] for k in ("seed", "data", "augment", "train")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def load_pretrained(model: nn.Module, spec: str) -> set[str]:
    """Copy matching tensors from local weights (or torchvision hub weights when online).

    Returns the names of the parameters that were loaded (the backbone); the rest (the new
    head, a changed stem) start fresh.
    """
    if spec.startswith("torchvision:"):
        state = _torchvision_weights(model, spec.split(":", 1)[1])
        state = {f"net.{k}": v for k, v in state.items()}
    else:
        if not Path(spec).is_file():
            raise ConfigError(f"train.pretrained={spec!r}: file not found")
        blob = torch.load(spec, map_location="cpu", weights_only=True)
        state = blob.get("state_dict", blob) if isinstance(blob, dict) else {}
    own = model.state_dict()
    fresh = {"mean", "std", *_head_keys(model)}  # new data's normalisation, a new head
    matched = {k: v for k, v in state.items()
               if k in own and own[k].shape == v.shape and k not in fresh}
    if not matched:
        raise ConfigError(f"train.pretrained={spec!r}: no tensor matches the model")
    model.load_state_dict(matched, strict=False)
    return {n for n, _ in model.named_parameters() if n in matched}


def _head_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the final Linear layer: the head that transfer learning replaces."""
    last = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    return [f"{last}.weight", f"{last}.bias"]


def _torchvision_weights(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    arch = type(model.net).__name__.lower()
    try:
        weights = torchvision.models.get_model_weights(arch)[name]
        return weights.get_state_dict(progress=False)
    except Exception as err:  # offline or unknown weights
        raise ConfigError(f"train.pretrained='torchvision:{name}': cannot load ({err})") from None


def run(params: Params, layout: Layout) -> TrainResult:
    cfg = params.train
    dist = engine.init_distributed(cfg.device)
    device = pick_device(cfg.device, dist.local_rank)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(params.seed)

    cache = load_cache(layout.cache)
    classes: list[str] = cache["classes"]
    mean, std = channel_stats(cache["train_x"])
    arch = Arch(cfg.model, len(classes), cache["image_size"], cache["channels"], mean, std,
                classes)
    model = build_classifier(arch)
    backbone = load_pretrained(model, cfg.pretrained) if cfg.pretrained else set()
    train_x, train_y, streaming = _place(cache["train_x"], cache["train_y"], device)
    fit_run = FitRun(model, train_x, train_y, Recipe.from_params(cfg), params.augment,
                     num_classes=len(classes), device=device, seed=params.seed, dist=dist,
                     backbone=backbone)
    chash = config_hash(params)
    history: list[dict[str, Any]] = []
    resumed = engine.restore_checkpoint(layout.checkpoint, chash)
    if resumed is not None:
        state, history = resumed
        fit_run.load_state_dict(state)
        _log(dist, f"resuming from {layout.checkpoint} after epoch {fit_run.epoch}")
    if streaming:
        _log(dist, "dataset larger than half the free device memory: streaming batches "
                   "from pinned host memory")
    val_x = cache["val_x"].to(device) if dist.main and len(cache["val_x"]) else None
    val_y = cache["val_y"].to(device) if val_x is not None else None

    with _run_context(layout, params, device, dist):
        t_start = time.perf_counter()
        epochs = _EpochLog(params, layout, dist, device, chash, history, val_x, val_y, t_start)
        bar = engine.Progress(fit_run.total, start=fit_run.step) \
            if cfg.progress and dist.main else None
        try:
            result = fit_run.run([epochs], progress=bar)
        finally:
            if bar is not None:
                bar.close()
        if dist.main:
            final = result.model
            if cfg.calibrate and val_x is not None:
                arch.temperature = _calibrate(final, val_x, val_y, device)
                _log(dist, f"softmax temperature {arch.temperature:.3f} (fitted on "
                           f"{len(val_x)} val images)")
            save_classifier(layout.model, final, arch, history=json.dumps(history))
            write_csv(layout.history, history)
            _log_artifact(layout.history)
    if dist.main:
        layout.checkpoint.unlink(missing_ok=True)
    seconds = sum(row["seconds"] for row in history)
    images = sum(row["seconds"] * row["img_per_s"] for row in history)
    return TrainResult(layout.model, len(history), history[-1]["val_top1"] if history else None,
                       seconds, images / max(seconds, 1e-9), str(device))


class _EpochLog:
    """The stage's epoch callback: val accuracy, history row, MLflow, checkpoint, early stop
    and time budget. Runs between epochs, outside `fit`'s timed window."""

    def __init__(self, params: Params, layout: Layout, dist, device, chash: str,
                 history: list[dict[str, Any]], val_x, val_y, t_start: float) -> None:
        self.cfg, self.layout, self.dist, self.device = params.train, layout, dist, device
        self.chash, self.history, self.val_x, self.val_y = chash, history, val_x, val_y
        self.t_start = t_start
        self.best = max((r["val_top1"] for r in history if r.get("val_top1") is not None),
                        default=-1.0)
        self.stale = _stale_epochs(history)

    def __call__(self, e: EpochEnd) -> bool:
        val = _accuracy(e.model, self.val_x, self.val_y) if self.val_x is not None else None
        e.metrics["val_top1"] = val
        row = {"epoch": e.epoch, "train_loss": e.train_loss, "train_top1": e.train_top1,
               "val_top1": val, "lr": e.lr, "img_per_s": e.images / max(e.seconds, 1e-9),
               "seconds": e.seconds}
        if self.device.type == "cuda":
            row["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.history.append(row)
        if self.dist.main:
            _log_epoch(row)
            engine.save_checkpoint(self.layout.checkpoint, self.chash, e.run.state_dict(),
                                   self.history)
        if val is not None and self.cfg.early_stop_patience:
            self.best, self.stale = (val, 0) if val > self.best else (self.best, self.stale + 1)
        return _should_stop(self.stale, self.cfg.early_stop_patience, self.t_start,
                            self.cfg.time_budget_s)


def _stale_epochs(history: list[dict[str, Any]]) -> int:
    """Epochs since the best val accuracy (to resume early stopping where it was)."""
    best, stale = -1.0, 0
    for r in history:
        v = r.get("val_top1")
        if v is not None:
            best, stale = (v, 0) if v > best else (best, stale + 1)
    return stale


def _place(x: torch.Tensor, y: torch.Tensor, device: torch.device):
    """Whole dataset on the device when it fits, else pinned host memory (streaming)."""
    if engine.fits_on_device(x.numel() * x.element_size(), device):
        return x.to(device), y.to(device), False
    return x.pin_memory(), y.pin_memory(), True


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 on the device: bf16 on CUDA, large batches, one number back."""
    logits = device_logits(model, x, 1024, tta=0, amp=True)
    return float((logits.argmax(1) == y).float().mean())


def _calibrate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device) -> float:
    logits = device_logits(model, x, 1024, device).cpu()
    t = round(fit_temperature(logits, y.cpu()), 6)
    mlflow.log_metric("temperature", t)
    return t


def _should_stop(stale: int, patience: int | None, t_start: float,
                 budget: float | None) -> bool:
    return bool(patience and stale >= patience) or bool(
        budget and time.perf_counter() - t_start > budget)


@contextlib.contextmanager
def _run_context(layout: Layout, params: Params, device: torch.device, dist):
    """Rank 0 opens the pipeline's MLflow run; other ranks log nothing."""
    if not dist.main:
        yield None
        return
    tags = {"stage": "train", "data_hash": _data_hash(layout), "device": str(device),
            "world_size": str(dist.world)}
    name = f"{params.train.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    with tracking.new_run(layout, name, tags) as run:
        mlflow.log_params(tracking.flat_params(params.dump()))
        tracking.log_validation(layout)  # validation report, data summary, quarantine, Data Docs
        tracking.log_dir_or_file(layout.policy, "data")
        yield run


def _log_epoch(row: dict[str, Any]) -> None:
    mlflow.log_metrics({k: v for k, v in row.items() if v is not None and k != "epoch"},
                       step=row["epoch"])


def _log_artifact(path: Path) -> None:
    mlflow.log_artifact(str(path), "train")


def _log(dist, msg: str) -> None:
    if dist.main:
        print(msg, flush=True)


def _data_hash(layout: Layout) -> str:
    return (read_json(layout.validation) or {}).get("data_hash", "")
