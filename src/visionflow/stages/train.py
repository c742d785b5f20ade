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
import torch.distributed as tdist
import torch.nn.functional as F
import torchvision
from torch import nn

from visionflow.config import Params
from visionflow.data.cache import load_cache
from visionflow.errors import ConfigError
from visionflow.files import read_json, write_csv
from visionflow.layout import Layout
from visionflow.mlops import tracking
from visionflow.model import engine
from visionflow.model.augment_ops import augment_batch, mix_batch
from visionflow.model.calibration import fit_temperature
from visionflow.model.classifier import Arch, build_classifier, save_classifier
from visionflow.model.inference import pick_device, predict_logits
from visionflow.model.zoo import init_whitening
from visionflow.stages import main


@dataclass
class TrainResult:
    model_path: Path
    epochs_run: int
    val_top1: float | None
    seconds: float
    images_per_s: float
    device: str


def channel_stats(x: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of a uint8 N×C×H×W tensor, in [0, 1] units."""
    xf = x[:8192].float().div_(255)
    return xf.mean(dim=(0, 2, 3)).tolist(), xf.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()


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


def _set_frozen(model: nn.Module, backbone: set[str], frozen: bool) -> None:
    for name, p in model.named_parameters():
        if name in backbone:
            p.requires_grad_(not frozen)


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
    if cfg.model == "fast" and not backbone:
        sample = cache["train_x"][:5000].float().div(255)
        init_whitening(model.net, (sample - model.mean) / model.std)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)

    train_x, train_y, streaming = _place(cache["train_x"], cache["train_y"], device)
    world_batch = cfg.batch_size * dist.world
    steps_per_epoch = max(1, len(train_x) // world_batch)
    total = steps_per_epoch * cfg.epochs
    optimizer = engine.make_optimizer(model, cfg, backbone)
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: engine.lr_factor(s, total, warmup, cfg.schedule))
    scaler = engine.make_scaler(device, cfg.amp)
    ema = engine.make_ema(model, cfg.ema_decay)
    gens = {  # the permutation is shared by all ranks; augmentation differs per rank
        "perm": torch.Generator(device=train_x.device).manual_seed(params.seed),
        "aug": torch.Generator(device=device).manual_seed(params.seed + 1000 * dist.rank),
    }
    chash = config_hash(params)
    start_epoch, history = 0, []
    resumed = engine.restore_checkpoint(layout.checkpoint, chash, model, optimizer, scheduler,
                                        scaler, ema, gens)
    if resumed is not None:
        start_epoch, history = resumed
        _log(dist, f"resuming from {layout.checkpoint} after epoch {start_epoch}")
    if streaming:
        _log(dist, "dataset larger than half the free device memory: streaming batches "
                   "from pinned host memory")
    step_model: nn.Module = model
    if dist.enabled:
        step_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        step_model = torch.compile(step_model)

    loop = _Loop(params, step_model, optimizer, scheduler, scaler, ema, gens, device, dist,
                 len(classes), steps_per_epoch)
    t_start, images_seen = time.perf_counter(), 0
    with _run_context(layout, params, device, dist):
        bar = engine.Progress(total, enabled=cfg.progress and dist.main,
                              start=start_epoch * steps_per_epoch)
        best, stale = -1.0, 0
        for epoch in range(start_epoch, cfg.epochs):
            _set_frozen(model, backbone, frozen=epoch < cfg.freeze_epochs)
            t0 = time.perf_counter()
            loss_sum, correct, seen = loop.epoch(train_x, train_y, bar)
            dt = time.perf_counter() - t0
            images_seen += seen * dist.world
            eval_model = ema.module if ema is not None else model
            row = {"epoch": epoch + 1, "train_loss": loss_sum / max(1, seen),
                   "train_top1": correct / max(1, seen),
                   "val_top1": _accuracy(eval_model, cache, device) if dist.main else None,
                   "lr": optimizer.param_groups[0]["lr"],
                   "img_per_s": seen * dist.world / dt, "seconds": dt}
            if device.type == "cuda":
                row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            history.append(row)
            if dist.main:
                _log_epoch(row)
                engine.save_checkpoint(layout.checkpoint, engine.checkpoint_state(
                    chash, epoch + 1, model, optimizer, scheduler, scaler, ema, gens, history))
            if row["val_top1"] is not None and cfg.early_stop_patience:
                best, stale = (row["val_top1"], 0) if row["val_top1"] > best else (best, stale + 1)
            if _should_stop(dist, stale, cfg.early_stop_patience, t_start, cfg.time_budget_s):
                break
        bar.close()
        if dist.main:
            final = ema.module if ema is not None else model
            if cfg.calibrate and len(cache["val_x"]):
                arch.temperature = _calibrate(final, cache, device)
                _log(dist, f"softmax temperature {arch.temperature:.3f} (fitted on "
                           f"{len(cache['val_x'])} val images)")
            save_classifier(layout.model, final, arch, history=json.dumps(history))
            write_csv(layout.history, history)
            _log_artifact(layout.history)
    if dist.main:
        layout.checkpoint.unlink(missing_ok=True)
    seconds = time.perf_counter() - t_start
    return TrainResult(layout.model, len(history), history[-1]["val_top1"] if history else None,
                       seconds, images_seen / max(seconds, 1e-9), str(device))


class _Loop:
    """One epoch of augmented mini-batch SGD on device-resident (or streamed) data."""

    def __init__(self, params, model, optimizer, scheduler, scaler, ema, gens, device, dist,
                 num_classes, steps) -> None:
        self.p, self.model, self.opt, self.sched = params, model, optimizer, scheduler
        self.scaler, self.ema, self.gens, self.device = scaler, ema, gens, device
        self.dist, self.num_classes, self.steps = dist, num_classes, steps

    def epoch(self, train_x, train_y, bar) -> tuple[float, int, int]:
        cfg, aug, d = self.p.train, self.p.augment, self.dist
        self.model.train()
        perm = torch.randperm(len(train_x), device=train_x.device, generator=self.gens["perm"])
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        seen = 0
        for i in range(self.steps):
            start = (i * d.world + d.rank) * cfg.batch_size
            idx = perm[start:start + cfg.batch_size]
            xb = augment_batch(train_x[idx].to(self.device, non_blocking=True), aug,
                               self.gens["aug"])
            yb = train_y[idx].to(self.device, non_blocking=True)
            target = yb
            if aug.mix_p > 0:
                xb, target = mix_batch(xb, yb, self.num_classes, aug, self.gens["aug"])
            if cfg.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with engine.autocast(self.device, cfg.amp):
                logits = self.model(xb)
            loss = F.cross_entropy(logits.float(), target, label_smoothing=cfg.label_smoothing)
            self.opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if cfg.grad_clip:
                self.scaler.unscale_(self.opt)
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.scaler.step(self.opt)
            self.scaler.update()
            self.sched.step()
            if self.ema is not None:
                self.ema.update_parameters(_unwrap(self.model))
            loss_sum += loss.detach() * len(idx)
            correct += (logits.argmax(1) == yb).sum()
            seen += len(idx)
            bar.advance(len(idx), loss, correct, seen)
        return float(loss_sum), int(correct), seen


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def _place(x: torch.Tensor, y: torch.Tensor, device: torch.device):
    """Whole dataset on the device when it fits, else pinned host memory (streaming)."""
    if engine.fits_on_device(x.numel() * x.element_size(), device):
        return x.to(device), y.to(device), False
    return x.pin_memory(), y.pin_memory(), True


def _accuracy(model: nn.Module, cache: dict, device: torch.device) -> float | None:
    if not len(cache["val_x"]):
        return None
    logits = predict_logits(model, cache["val_x"], 512, device)
    return float((logits.argmax(1) == cache["val_y"]).float().mean())


def _calibrate(model: nn.Module, cache: dict, device: torch.device) -> float:
    t = round(fit_temperature(predict_logits(model, cache["val_x"], 512, device),
                              cache["val_y"]), 6)
    mlflow.log_metric("temperature", t)
    return t


def _should_stop(dist, stale, patience, t_start, budget) -> bool:
    stop = bool(patience and stale >= patience) or bool(
        budget and time.perf_counter() - t_start > budget)
    if dist.enabled:  # every rank must agree, or DDP hangs
        flag = torch.tensor([float(stop)])
        tdist.broadcast(flag, src=0)
        stop = bool(flag.item())
    return stop


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


if __name__ == "__main__":
    main("train", run)
