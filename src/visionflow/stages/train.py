"""Stage 3, train: fit a zoo CNN on the packed data, GPU when present, else CPU.

The uint8 cache goes to the training device once (streamed from pinned host memory when
it does not fit); batches are indexed and augmented there. Writes `model.pt` (arch +
state dict), `history.csv` and `run.json`, and logs params and per-epoch metrics to
MLflow. A checkpoint after every epoch lets an interrupted run resume (`kill -9` loses at
most one epoch). `torchrun --nproc_per_node=N vflow stage train` runs the same code with
DDP: data sharded per rank, rank 0 alone logs and writes.

In shards mode (`data.storage`, issue #18) the images stream from the pack stage's shards
(`data.feed`): decoded and cropped in DataLoader workers on the CPU, or decoded on the GPU
(`model.gpu_decode`, nvJPEG) on CUDA; a checkpoint every `train.checkpoint_steps` steps
holds the loader's position, so a kill resumes mid-epoch.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import torch
from torch import nn

from visionflow.core.config import Params
from visionflow.core.files import write_csv
from visionflow.core.layout import Layout
from visionflow.data.feed import Feed, is_shards, tensor_feed, training_feed
from visionflow.data.packed import load_packed
from visionflow.mlops.train_run import log_epoch, train_run
from visionflow.model import engine
from visionflow.model.calibration import fit_temperature, unfittable
from visionflow.model.classifier import save_classifier
from visionflow.model.fit import EpochEnd
from visionflow.model.inference import device_logits, pick_device, stream_logits
from visionflow.model.trainer import prepare_fit, top1
from visionflow.stages import main
from visionflow.tasks.segmentation import train as segmentation

# task -> its own run (params.task; classification is this module's `run`)
TASKS = {"segmentation": segmentation.run}


@dataclass
class TrainResult:
    model_path: Path
    epochs_run: int
    val_top1: float | None
    seconds: float
    images_per_s: float
    device: str


def run(params: Params, layout: Layout) -> TrainResult:
    if params.task in TASKS:
        return TASKS[params.task](params, layout)
    cfg = params.train
    dist = engine.init_distributed(cfg.device)
    device = pick_device(cfg.device, dist.local_rank)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device.type == "cpu":
        engine.keep_freed_cpu_memory()
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(params.seed)
    # torch.compile's kernels survive between runs of a flow (train.compile: auto on CUDA)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(layout.cache_root / "inductor"))

    cache = load_packed(layout.packed)
    decode = None
    if is_shards(cache):
        data = training_feed(params, layout, cache, main=dist.main, raw=device.type == "cuda")
        if device.type == "cuda":  # nvJPEG: batched decode + crops on the GPU
            decode = _gpu_decoder(params, cache, device)
    else:
        data = tensor_feed(cache, device, dist.main)
    prepared = prepare_fit(data.sample_x, data.sample_y, cache["classes"], cfg,
                           data.policy(params.augment), device=device, seed=params.seed,
                           dist=dist, stream=data.stream, decode=decode)
    fit_run, arch, streaming = prepared.run, prepared.arch, prepared.streaming
    if is_shards(cache):  # inputs are resized and centre-cropped when it predicts
        arch.resize_size = cache["resize_size"]
    chash = params.identity("seed", "data", "augment", "train")
    history: list[dict[str, Any]] = []
    resumed = engine.restore_checkpoint(layout.checkpoint, chash)
    if resumed is not None:
        state, history = resumed
        fit_run.load_state_dict(state)
        engine.say(dist, f"resuming from {layout.checkpoint} after epoch {fit_run.epoch}, "
                   f"step {fit_run.step}")
    if streaming:
        engine.say(dist, "dataset larger than half the free device memory: streaming batches "
                   "from pinned host memory")

    with train_run(params, layout, str(device), dist):
        t_start = time.perf_counter()
        epochs = _EpochLog(params, layout, dist, device, chash, history, data, t_start)
        bar = engine.Progress(fit_run.total, start=fit_run.step) \
            if cfg.progress and dist.main else None
        try:
            result = fit_run.run([epochs], progress=bar,
                                 on_step=epochs.on_step if data.stream is not None else None)
        finally:
            if bar is not None:
                bar.close()
        engine.check_the_loss(epochs.diverged, history, len(cache["classes"]),
                              ("train.lr", cfg.lr), layout.checkpoint, dist, device)
        if dist.enabled:
            engine.rank_line(dist, engine.replicas_agree(result.model, device))
        if dist.main:
            final = result.model
            if cfg.calibrate and data.has_val:
                logits, val_y = _val_logits(data, final, amp=False)
                arch.temperature = _calibrate(logits, val_y)
                why, n = unfittable(logits, val_y), len(val_y)
                engine.say(dist, f"softmax temperature {arch.temperature:.3f} " + (
                    f"({why}: mean top probability set to {n + 1}/{n + 2})" if why
                    else f"(fitted on {n} val images)"))
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
                 history: list[dict[str, Any]], data, t_start: float) -> None:
        self.cfg, self.layout, self.dist, self.device = params.train, layout, dist, device
        self.chash, self.history, self.data = chash, history, data
        self.t_start = t_start
        self.best = max((r["val_top1"] for r in history if r.get("val_top1") is not None),
                        default=-1.0)
        self.stale = _stale_epochs(history)
        self.diverged: int | None = None  # the epoch whose loss was not a number

    def __call__(self, e: EpochEnd) -> bool:
        broken = not math.isfinite(e.train_loss)
        if self.dist.enabled:  # rank 0's word: a rank whose mean stayed finite must not go
            broken = engine.broadcast_flag(broken, self.device)  # on to the checkpoint alone
        if broken:  # no checkpoint of a broken model: stop here
            self.diverged = e.epoch
            return True
        val = _val_top1(self.data, e.model) if self.data.has_val else None
        e.metrics["val_top1"] = val
        row = {"epoch": e.epoch, "train_loss": e.train_loss, "train_top1": e.train_top1,
               "val_top1": val, "lr": e.lr, "img_per_s": e.images / max(e.seconds, 1e-9),
               "seconds": e.seconds}
        if self.device.type == "cuda":
            row["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.history.append(row)
        state = e.run.state_dict()  # every rank: under DDP each rank's part is gathered
        if self.dist.main:
            log_epoch(row)
            engine.save_checkpoint(self.layout.checkpoint, self.chash, state, self.history)
        if val is not None and self.cfg.early_stop_patience:
            self.best, self.stale = (val, 0) if val > self.best else (self.best, self.stale + 1)
        return _should_stop(self.stale, self.cfg.early_stop_patience, self.t_start,
                            self.cfg.time_budget_s)

    def on_step(self, run) -> None:
        """Streaming: a checkpoint every `train.checkpoint_steps` steps, with the loader's
        position, so that a kill resumes at the batch where it stopped."""
        if run.step % self.cfg.checkpoint_steps == 0:
            state = run.state_dict()  # every rank, as above
            if self.dist.main:
                engine.save_checkpoint(self.layout.checkpoint, self.chash, state, self.history)


def _stale_epochs(history: list[dict[str, Any]]) -> int:
    """Epochs since the best val accuracy (to resume early stopping where it was)."""
    best, stale = -1.0, 0
    for r in history:
        v = r.get("val_top1")
        if v is not None:
            best, stale = (v, 0) if v > best else (best, stale + 1)
    return stale


def _gpu_decoder(params: Params, cache: dict[str, Any], device: torch.device):
    # imported here only: the CUDA branch (torchvision's nvJPEG decode, issue #18)
    gpu_decode = importlib.import_module("visionflow.model.gpu_decode")
    d = params.data
    return gpu_decode.GpuBatchTransform(train=True, size=cache["image_size"],
                             resize_size=cache["resize_size"], scale=tuple(d.crop_scale),
                             ratio=tuple(d.crop_ratio), hflip=params.augment.hflip > 0,
                             channels=cache["channels"], device=device, seed=params.seed)


def _val_logits(data: Feed, model: nn.Module, amp: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if data.val_stream is not None:
        return stream_logits(model, data.val_stream.epoch(), amp=amp)
    return device_logits(model, data.val_x, 1024, amp=amp), data.val_y


def _val_top1(data: Feed, model: nn.Module) -> float:
    if data.val_stream is None:
        return top1(model, data.val_x, data.val_y)  # the tensor path, as before
    logits, y = _val_logits(data, model, amp=True)
    return float((logits.argmax(1) == y).float().mean())


def _calibrate(logits: torch.Tensor, y: torch.Tensor) -> float:
    t = round(fit_temperature(logits.cpu(), y.cpu()), 6)
    mlflow.log_metric("val/temperature", t)
    return t


def _should_stop(stale: int, patience: int | None, t_start: float,
                 budget: float | None) -> bool:
    return bool(patience and stale >= patience) or bool(
        budget and time.perf_counter() - t_start > budget)


def _log_artifact(path: Path) -> None:
    mlflow.log_artifact(str(path), "train")


if __name__ == "__main__":
    main("train", run)
