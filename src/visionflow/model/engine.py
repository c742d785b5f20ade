"""Training building blocks: device, distributed setup, optimizer, schedule, EMA,
checkpoints and the progress bar. `fit.py` runs the loop; `stages/train.py` wires the stage.

torch only (plus `rich`, imported when a progress bar is shown): the GPU benchmark machine
runs this without pydantic. Config objects are duck-typed (`config.TrainConfig` or
`fit.Recipe`, both have the attributes read here).
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visionflow.core.env import on_parent_death
from visionflow.core.errors import VisionflowError
from visionflow.core.files import torch_save

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


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

    if "TORCHELASTIC_RUN_ID" in os.environ:  # a rank torchrun started: ends with torchrun
        on_parent_death(signal.SIGKILL)()
    use_nccl = device_name != "cpu" and torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_nccl else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_nccl:
        torch.cuda.set_device(local)
    return Dist(dist.get_rank(), dist.get_world_size(), local)


def collective_device(backend: str, device: torch.device) -> torch.device:
    """Where a collective's tensors must live: NCCL moves CUDA tensors only, gloo CPU ones."""
    if backend == "nccl":
        if device.type == "cuda":
            return device
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's `flag` on every rank (so that all ranks stop together, or DDP hangs)."""
    import torch.distributed as dist

    t = torch.tensor([float(flag)], device=collective_device(dist.get_backend(), device))
    dist.broadcast(t, src=0)
    return bool(t.item())


def gather_objects(dist: Dist, obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order, on every rank; [obj] in one process."""
    if not dist.enabled:
        return [obj]
    import torch.distributed as tdist

    out: list[Any] = [None] * dist.world
    tdist.all_gather_object(out, obj)
    return out


def say(dist: Dist, msg: str) -> None:
    """Print on rank 0 only (what the run does, once, not once per rank)."""
    if dist.main:
        print(msg, flush=True)


def rank_line(dist: Dist, msg: str) -> None:
    """`rank N: msg` as one write: ranks share torchrun's output, and with `python -u` a
    print's text and its newline are two writes that another rank's line can come between."""
    sys.stdout.write(f"rank {dist.rank}: {msg}\n")
    sys.stdout.flush()


def check_the_loss(diverged: int | None, history: list[dict[str, Any]], classes: int,
                   lr: tuple[str, float], checkpoint: Path, dist: Dist,
                   device: torch.device) -> None:
    """After training, before anything is written: a loss that was not a number (in epoch
    `diverged`, rank 0's word on every rank) stops the stage in one line and drops the
    checkpoint (a rerun would resume the broken weights); a last epoch's loss above a uniform
    guess's ln(classes) is a warning (diverged, or learned nothing). `lr`: (its key, value)."""
    stop = diverged is not None
    if dist.enabled:  # every rank raises, or none does
        stop = broadcast_flag(stop, device)
    if stop:
        if dist.main:
            checkpoint.unlink(missing_ok=True)
        raise VisionflowError(f"train: the loss is not a number in epoch {diverged or '?'}: "
                              f"training diverged; lower {lr[0]} (now {lr[1]:g})")
    last = history[-1]["train_loss"] if history else 0.0
    if classes > 1 and last > math.log(classes):
        say(dist, f"warning: the last epoch's train loss {last:.3g} is above a uniform "
            f"guess's ln({classes}) = {math.log(classes):.3g}: training diverged or learned "
            f"nothing; a lower {lr[0]} (now {lr[1]:g})?")


def replicas_agree(model: nn.Module, device: torch.device) -> str:
    """After DDP training, that every rank holds the same weights (their float64 sum, compared
    across ranks); raises when they differ: the replicas were not kept in step."""
    import torch.distributed as dist

    with torch.no_grad():
        total = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum()
    t = torch.stack([total, -total]).to(collective_device(dist.get_backend(), device))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # [largest sum, -smallest sum]
    if t[0].item() != -t[1].item():
        raise RuntimeError(f"DDP replicas differ after training: weight sums "
                           f"{-t[1].item():.17g} to {t[0].item():.17g} across ranks")
    return f"weights agree across {dist.get_world_size()} ranks"


def param_groups(model: nn.Module, cfg: Any, backbone: set[str]) -> list[dict]:
    """SGD/AdamW groups from `cfg` (lr, weight_decay, backbone_lr_mult; optional bias_lr_scale,
    decay_biases).

    - weight decay on weights (ndim > 1); on biases and norm parameters only with
      `decay_biases`;
    - the pretrained backbone at lr x backbone_lr_mult;
    - norm-layer biases at lr x bias_lr_scale, their weight decay divided by the same factor,
      so that the decay per step (lr x wd) does not depend on the bias scale.
    """
    norm_biases = {id(m.bias) for m in model.modules()
                   if isinstance(m, _NORMS) and getattr(m, "bias", None) is not None}
    bias_scale = float(getattr(cfg, "bias_lr_scale", 1.0))
    decay_biases = bool(getattr(cfg, "decay_biases", False))
    groups: dict[tuple[bool, bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad or name in backbone:
            key = (p.ndim > 1 or decay_biases, name in backbone, id(p) in norm_biases)
            groups.setdefault(key, []).append(p)
    out = []
    for (decay, is_backbone, norm_bias), ps in groups.items():
        scale = bias_scale if norm_bias else 1.0
        out.append({"params": ps, "lr": cfg.lr * scale * (cfg.backbone_lr_mult if is_backbone
                                                            else 1.0),
                    "weight_decay": cfg.weight_decay / scale if decay else 0.0})
    return out


def make_optimizer(model: nn.Module, cfg: Any, backbone: set[str]) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg, backbone)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


def lr_factor(step: int, total: int, warmup: int, schedule: str, start: float = 0.0,
              end: float = 0.0) -> float:
    """Linear warm-up from `start` to 1, then cosine / linear / constant decay to `end`
    (factors of the base lr); onecycle warms up for 30%."""
    if schedule == "onecycle":
        warmup = max(1, int(0.3 * total))
    if step < warmup:
        return start + (1 - start) * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule in ("cosine", "onecycle"):
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return max(0.0, 1 - (1 - end) * progress)
    return 1.0


class EMA:
    """Exponential moving average of a model's floating-point state (parameters and buffers),
    updated every `every` steps with foreach ops on the device: no host sync, no CPU counter
    tensor (the update count is a host int).

    The decay per update is `decay ** every * (step / total) ** ramp` (ramp 0: constant); the
    first update copies (as `AveragedModel`). With `lookahead` the model itself is reset to
    the average after each update, and `finish` leaves the average in the model.
    """

    def __init__(self, model: nn.Module, decay: float, every: int = 1, ramp: float = 0.0,
                 lookahead: bool = False) -> None:
        self.decay, self.every, self.ramp, self.lookahead = decay, max(1, every), ramp, lookahead
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.updates = 0
        self._model = model
        self._pairs()

    def _pairs(self) -> None:
        src, dst = self._model.state_dict(keep_vars=True), self.module.state_dict(keep_vars=True)
        floats = [k for k, v in src.items() if v.is_floating_point()]
        self._src = [src[k].detach() for k in floats]
        self._dst = [dst[k].detach() for k in floats]
        ints = [k for k, v in src.items() if not v.is_floating_point()]
        self._src_int = [src[k].detach() for k in ints]
        self._dst_int = [dst[k].detach() for k in ints]

    @torch.no_grad()
    def copy_from_model(self) -> None:
        torch._foreach_copy_(self._dst, self._src)
        if self._dst_int:
            torch._foreach_copy_(self._dst_int, self._src_int)

    @torch.no_grad()
    def update(self, step: int, total: int) -> None:
        """Call after optimizer step number `step` (1-based) of `total`."""
        if step % self.every:
            return
        d = self.decay ** self.every
        if self.ramp:
            d *= (step / max(1, total)) ** self.ramp
        if self.updates == 0:
            self.copy_from_model()
        else:
            torch._foreach_lerp_(self._dst, self._src, 1.0 - d)
            if self._dst_int:
                torch._foreach_copy_(self._dst_int, self._src_int)
        self.updates += 1
        if self.lookahead:
            torch._foreach_copy_(self._src, self._dst)

    @torch.no_grad()
    def finish(self) -> None:
        """Lookahead: leave the average in the model (the record scripts' last sync)."""
        if self.lookahead and self.updates:
            torch._foreach_copy_(self._src, self._dst)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])


def make_ema(model: nn.Module, decay: float | None, every: int = 1, ramp: float = 0.0,
             lookahead: bool = False) -> EMA | None:
    if decay is None:
        return None
    return EMA(model, decay, every, ramp, lookahead)


def keep_freed_cpu_memory() -> bool:
    """CPU training: glibc gives every freed large block (a step's activations, hundreds of
    MB at batch 2000) back to the kernel, and the next step faults it in again page by page:
    about 30% of a CPU run's time was kernel time (BENCHMARKS.md). Keep freed memory in the
    process's heap instead (no mmap for large blocks, no trimming), so steps reuse it; the
    resident set then stays at its peak. Process-wide; False where libc is not glibc."""
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


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

def save_checkpoint(path: Path, chash: str, fit_state: dict[str, Any],
                    history: list[dict]) -> None:
    """Atomic: a temp file, then a rename (`kill -9` leaves the previous checkpoint)."""
    torch_save({"config_hash": chash, "fit": fit_state, "history": json.dumps(history)}, path)


def restore_checkpoint(path: Path, chash: str) -> tuple[dict[str, Any], list[dict]] | None:
    """(fit state, history) of a checkpoint written for the same config, else None."""
    if not path.is_file():
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("config_hash") != chash or "fit" not in ckpt:
        return None
    return ckpt["fit"], json.loads(ckpt["history"])


# --- progress --------------------------------------------------------------------

class Progress:
    """rich progress bar: loss, accuracy, img/s and ETA. `fit` calls it every few steps with
    values it read from its on-device accumulators (the only host syncs of a step)."""

    def __init__(self, total_steps: int, start: int = 0) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self.bar = RichProgress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn())
        self.task = self.bar.add_task("train", total=total_steps, completed=start, info="")
        self.bar.start()

    def __call__(self, step: int, stats: dict[str, float]) -> None:
        info = (f"loss {stats['loss']:.3f} acc {stats['top1']:.3f} "
                f"{stats['img_per_s']:,.0f} img/s")
        self.bar.update(self.task, completed=step, info=info)

    def close(self) -> None:
        self.bar.stop()
