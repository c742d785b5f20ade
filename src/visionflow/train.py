"""Stage 3, train: fit a registry CNN on the augment cache, GPU when present, else CPU.

The uint8 cache is moved to the training device once; batches are indexed and
augmented there. Writes `model.pt` (arch + state dict), `history.csv` and `run.json`,
and logs params and per-epoch metrics to MLflow. A checkpoint after every epoch lets
an interrupted run resume (`kill -9` loses at most one epoch).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from visionflow.atomic import atomic_path, torch_save
from visionflow.augment import load_cache
from visionflow.classifier import Arch, build_classifier, save_classifier
from visionflow.config import Params, TrainConfig
from visionflow.layout import Layout


@dataclass
class TrainResult:
    model_path: Path
    epochs_run: int
    val_top1: float | None
    seconds: float
    images_per_s: float
    device: str


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from visionflow.errors import ConfigError

        raise ConfigError("train.device='cuda': no CUDA device is available")
    return torch.device(name)


def channel_stats(x: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of a uint8 N×C×H×W tensor, in [0, 1] units."""
    xf = x[:4096].float().div_(255)
    mean = xf.mean(dim=(0, 2, 3))
    std = xf.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return mean.tolist(), std.tolist()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on norms and biases (1-D parameters)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Linear warm-up, then cosine / linear / constant decay; onecycle = warm-up 30%."""
    if schedule == "onecycle":
        warmup = max(1, int(0.3 * total))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if schedule in ("cosine", "onecycle"):
        return 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return max(0.0, 1 - progress)
    return 1.0


def config_hash(params: Params) -> str:
    keep = {k: params.dump()[k] for k in ("seed", "data", "augment", "train")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def _autocast(device: torch.device, enabled: bool):
    if device.type == "cuda" and enabled:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast(device.type, enabled=False)


@torch.inference_mode()
def predict_logits(model: nn.Module, x_uint8: torch.Tensor, batch_size: int = 512,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Logits for a uint8 N×C×H×W tensor, batched; returns float32 on CPU."""
    model.eval()
    out = []
    for i in range(0, len(x_uint8), batch_size):
        xb = x_uint8[i:i + batch_size].to(device, non_blocking=True).float().div_(255)
        out.append(model(xb).float().cpu())
    n_cls = getattr(model, "num_classes", None)
    return torch.cat(out) if out else torch.zeros(0, n_cls or 0)


def load_pretrained(model: nn.Module, path: str) -> list[str]:
    """Copy matching tensors from a local weights file; returns the keys left out."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else blob
    own = model.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not matched:
        from visionflow.errors import ConfigError

        raise ConfigError(f"train.pretrained={path!r}: no tensor matches the model")
    model.load_state_dict(matched, strict=False)
    return sorted(set(own) - set(matched))


def run_train(params: Params, layout: Layout, progress: bool = True) -> TrainResult:
    from visionflow import tracking

    cfg = params.train
    device = pick_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(params.seed)

    cache = load_cache(layout.cache)
    classes: list[str] = cache["classes"]
    train_x, train_y = cache["train_x"], cache["train_y"]
    val_x, val_y = cache["val_x"], cache["val_y"]
    mean, std = channel_stats(train_x)
    arch = Arch(cfg.model, len(classes), cache["image_size"], cache["channels"], mean, std,
                classes)
    model = build_classifier(arch)
    head_keys: list[str] = []
    if cfg.pretrained:
        head_keys = load_pretrained(model, cfg.pretrained)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)

    train_x, train_y = _to_device(train_x, device), train_y.to(device)
    steps_per_epoch = max(1, len(train_x) // cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    optimizer = make_optimizer(model, cfg)
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, cfg.schedule))
    ema = _make_ema(model, cfg.ema_decay)
    gen = torch.Generator(device=device).manual_seed(params.seed)
    step_model = torch.compile(model) if cfg.compile else model

    start_epoch, history = 0, []
    chash = config_hash(params)
    resumed = _try_resume(layout.checkpoint, chash, model, optimizer, scheduler, ema, gen)
    if resumed is not None:
        start_epoch, history = resumed

    tags = {"stage": "train", "data_hash": _data_hash(layout), "device": str(device)}
    t_start, images_seen = time.perf_counter(), 0
    with tracking.new_run(layout, f"{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}", tags):
        import mlflow

        mlflow.log_params(tracking.flat_params(params.dump()))
        for f in (layout.validation, layout.policy):
            tracking.log_dir_or_file(f, "data")
        bar = _Progress(cfg.epochs * steps_per_epoch, enabled=progress,
                        start=start_epoch * steps_per_epoch)
        for epoch in range(start_epoch, cfg.epochs):
            _set_frozen(model, head_keys, frozen=epoch < cfg.freeze_epochs)
            t0 = time.perf_counter()
            loss_sum, correct, seen = _train_epoch(
                step_model, train_x, train_y, len(classes), params, optimizer, scheduler,
                ema, gen, device, steps_per_epoch, bar)
            dt = time.perf_counter() - t0
            images_seen += seen
            eval_model = ema.module if ema is not None else model
            val_top1 = _accuracy(eval_model, val_x, val_y, device) if len(val_x) else None
            row = {"epoch": epoch + 1, "train_loss": loss_sum / max(1, seen),
                   "train_top1": correct / max(1, seen), "val_top1": val_top1,
                   "lr": optimizer.param_groups[0]["lr"], "img_per_s": seen / dt,
                   "seconds": dt}
            if device.type == "cuda":
                row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
            history.append(row)
            mlflow.log_metrics({k: v for k, v in row.items()
                                if v is not None and k != "epoch"}, step=epoch + 1)
            _save_checkpoint(layout.checkpoint, chash, epoch + 1, model, optimizer,
                             scheduler, ema, gen, history)
            if cfg.time_budget_s and time.perf_counter() - t_start > cfg.time_budget_s:
                break
        bar.close()

        final = ema.module if ema is not None else model
        save_classifier(layout.model, final, arch, history=history)
        _write_history(layout.history, history)
        mlflow.log_artifact(str(layout.history), "train")
    layout.checkpoint.unlink(missing_ok=True)
    seconds = time.perf_counter() - t_start
    return TrainResult(layout.model, len(history), history[-1]["val_top1"] if history else None,
                       seconds, images_seen / max(seconds, 1e-9), str(device))


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.to(device, non_blocking=True)


def _train_epoch(model, train_x, train_y, num_classes, params, optimizer, scheduler, ema,
                 gen, device, steps, bar) -> tuple[float, int, int]:
    from visionflow.augment_ops import augment_batch, mix_batch

    cfg = params.train
    model.train()
    perm = torch.randperm(len(train_x), device=device, generator=gen)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    for i in range(steps):
        idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
        xb = augment_batch(train_x[idx], params.augment, gen)
        yb = train_y[idx]
        xb, target = mix_batch(xb, yb, num_classes, params.augment, gen)
        if cfg.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with _autocast(device, cfg.amp):
            logits = model(xb)
            loss = F.cross_entropy(logits.float(), target, label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        loss_sum += loss.detach() * len(idx)
        correct += (logits.argmax(1) == yb).sum()
        bar.advance(len(idx), loss, correct, (i + 1) * cfg.batch_size)
    n = steps * cfg.batch_size
    return float(loss_sum), int(correct), min(n, len(train_x))


def _accuracy(model, x, y, device) -> float:
    logits = predict_logits(model, x, 512, device)
    return float((logits.argmax(1) == y).float().mean())


def _make_ema(model: nn.Module, decay: float | None):
    if decay is None:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def _set_frozen(model: nn.Module, head_keys: list[str], frozen: bool) -> None:
    """While frozen, only the parameters not loaded from pretrained weights train."""
    if not head_keys:
        return
    heads = {k for k in head_keys}
    for name, p in model.named_parameters():
        p.requires_grad = (not frozen) or name in heads


def _save_checkpoint(path, chash, epoch, model, optimizer, scheduler, ema, gen, history):
    torch_save({
        "config_hash": chash, "epoch": epoch, "model": model.state_dict(),
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "rng_cpu": torch.get_rng_state(), "rng_gen": gen.get_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "history": json.dumps(history),
    }, path)


def _try_resume(path, chash, model, optimizer, scheduler, ema, gen):
    if not path.is_file():
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("config_hash") != chash:
        return None
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if ema is not None and ckpt["ema"] is not None:
        ema.load_state_dict(ckpt["ema"])
    torch.set_rng_state(ckpt["rng_cpu"])
    gen.set_state(ckpt["rng_gen"].to(gen.device) if gen.device.type != "cpu"
                  else ckpt["rng_gen"])
    if ckpt["rng_cuda"]:
        torch.cuda.set_rng_state_all(ckpt["rng_cuda"])
    print(f"resuming from {path} at epoch {ckpt['epoch']}")
    return ckpt["epoch"], json.loads(ckpt["history"])


def _data_hash(layout: Layout) -> str:
    if layout.validation.is_file():
        return json.loads(layout.validation.read_text()).get("data_hash", "")
    return ""


def _write_history(path: Path, history: list[dict[str, Any]]) -> None:
    keys = list(dict.fromkeys(k for row in history for k in row))
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)


class _Progress:
    """rich progress bar with loss, accuracy, img/s and ETA (no-op when disabled)."""

    def __init__(self, total_images_steps: int, enabled: bool, start: int = 0) -> None:
        self.enabled = enabled
        if not enabled:
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeRemainingColumn)

        self.progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                                 transient=False)
        self.task = self.progress.add_task("train", total=total_images_steps, completed=start,
                                           info="")
        self.progress.start()
        self.t0, self.images, self.step = time.perf_counter(), 0, 0

    def advance(self, n: int, loss: torch.Tensor, correct: torch.Tensor, seen: int) -> None:
        if not self.enabled:
            return
        self.images += n
        self.step += 1
        info = None
        if self.step % 20 == 0:  # .item() syncs the device: only now and then
            rate = self.images / (time.perf_counter() - self.t0)
            info = f"loss {loss.item():.3f} acc {int(correct) / max(1, seen):.3f} {rate:,.0f} img/s"
        self.progress.update(self.task, advance=1, **({"info": info} if info else {}))

    def close(self) -> None:
        if self.enabled:
            self.progress.stop()
