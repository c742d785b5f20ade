"""Training building blocks: device, distributed setup, optimizer, schedule, EMA,
checkpoints and the progress bar. `train.py` wires them into the stage."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visionflow.config import TrainConfig
from visionflow.errors import ConfigError
from visionflow.files import torch_save


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device='cuda': no CUDA device is available")
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


@dataclass
class Dist:
    """torchrun's environment: rank 0 alone logs to MLflow and writes outputs."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    use_nccl = device_name != "cpu" and torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_nccl else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_nccl:
        torch.cuda.set_device(local)
    return Dist(dist.get_rank(), dist.get_world_size(), local)


def param_groups(model: nn.Module, cfg: TrainConfig, backbone: set[str]) -> list[dict]:
    """No weight decay on norms and biases; pretrained backbone at lr × backbone_lr_mult."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad or name in backbone:
            groups.setdefault((p.ndim <= 1, name in backbone), []).append(p)
    return [{"params": ps, "weight_decay": 0.0 if no_decay else cfg.weight_decay,
             "lr": cfg.lr * (cfg.backbone_lr_mult if is_backbone else 1.0)}
            for (no_decay, is_backbone), ps in groups.items()]


def make_optimizer(model: nn.Module, cfg: TrainConfig, backbone: set[str]) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg, backbone)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Linear warm-up, then cosine / linear / constant decay; onecycle warms up for 30%."""
    if schedule == "onecycle":
        warmup = max(1, int(0.3 * total))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule in ("cosine", "onecycle"):
        return 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return max(0.0, 1 - progress)
    return 1.0


def make_ema(model: nn.Module, decay: float | None):
    if decay is None:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def autocast(device: torch.device, enabled: bool):
    """bf16 on CUDA (fp16 where bf16 is unsupported); fp32 on CPU."""
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=amp_dtype())
    return torch.autocast(device.type, enabled=False)


def amp_dtype() -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def make_scaler(device: torch.device, enabled: bool) -> torch.amp.GradScaler:
    use = device.type == "cuda" and enabled and amp_dtype() == torch.float16
    return torch.amp.GradScaler("cuda", enabled=use)


def fits_on_device(nbytes: int, device: torch.device, fraction: float = 0.5) -> bool:
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes < fraction * free


# --- checkpoints -----------------------------------------------------------------

def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    torch_save(state, path)


def checkpoint_state(chash: str, epoch: int, model, optimizer, scheduler, scaler, ema,
                     gens: dict[str, torch.Generator], history: list[dict]) -> dict[str, Any]:
    return {
        "config_hash": chash, "epoch": epoch, "model": model.state_dict(),
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "gens": {k: g.get_state() for k, g in gens.items()},
        "history": json.dumps(history),
    }


def restore_checkpoint(path: Path, chash: str, model, optimizer, scheduler, scaler, ema,
                       gens: dict[str, torch.Generator]) -> tuple[int, list[dict]] | None:
    """Load a checkpoint written for the same config; returns (epoch, history) or None."""
    if not path.is_file():
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("config_hash") != chash:
        return None
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    if ema is not None and ckpt["ema"] is not None:
        ema.load_state_dict(ckpt["ema"])
    torch.set_rng_state(ckpt["rng_cpu"])
    if ckpt["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng_cuda"])
    for k, g in gens.items():
        g.set_state(ckpt["gens"][k])
    return ckpt["epoch"], json.loads(ckpt["history"])


# --- progress --------------------------------------------------------------------

class Progress:
    """rich progress bar with loss, accuracy, img/s and ETA (a no-op when disabled)."""

    def __init__(self, total_steps: int, enabled: bool, start: int = 0) -> None:
        self.enabled = enabled
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self.bar = RichProgress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn())
        self.task = self.bar.add_task("train", total=total_steps, completed=start, info="")
        self.bar.start()
        self.t0, self.images, self.step = time.perf_counter(), 0, 0

    def advance(self, n: int, loss: torch.Tensor, correct: torch.Tensor, seen: int) -> None:
        if not self.enabled:
            return
        self.images += n
        self.step += 1
        fields = {}
        if self.step % 10 == 0:  # .item() syncs the device: only now and then
            rate = self.images / (time.perf_counter() - self.t0)
            fields["info"] = (f"loss {loss.item():.3f} acc {int(correct) / max(1, seen):.3f} "
                              f"{rate:,.0f} img/s")
        self.bar.update(self.task, advance=1, **fields)

    def close(self) -> None:
        if self.enabled:
            self.bar.stop()
