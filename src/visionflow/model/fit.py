"""The training loop shared by the train stage and the benchmarks: torch and torchvision only.

    run = FitRun(model, train_x, train_y, recipe, policy, num_classes=10, device=device)
    result = run.run(callbacks=[on_epoch])        # or: fit(model, x, y, recipe, policy, ...)

`model` (a `Classifier` or any module taking float [0, 1] images) is trained in place on uint8
N×C×H×W images that live on the training device (or in pinned host memory, streamed). Per
step: index a batch, augment it on the device (`augment_ops`), forward under bf16 autocast on
CUDA, SGD/AdamW step, LR schedule, EMA/lookahead with foreach ops. Nothing in a step reads a
device value back to the host: loss and accuracy accumulate on the device and are read every
`recipe.log_every` steps only when a `progress` callable is given, and once per epoch.

The timed window (`FitResult.train_seconds`) holds the whitening (and Dirac init) of a `fast`
net, the training steps and nothing else: `torch.compile`'s warm-up runs before it, and the
epoch callbacks (validation, checkpoints, MLflow, early stopping, pruning in a
hyperparameter search) run between epochs with the clock stopped.

Epoch callback API: `callback(e: EpochEnd) -> bool | None`, called on every rank after each
epoch, in list order; any callback returning True stops training after this epoch (under DDP
rank 0's answer is broadcast, so all ranks stop together). `e.metrics` is one dict shared by
the callbacks of that epoch: an evaluation callback puts `val_top1` there, a later early-stop
callback reads it. `e.model` is the model to evaluate (the EMA average when EMA is on);
`e.run.state_dict()` is what a checkpoint needs (`FitRun.load_state_dict` resumes it; under
DDP every rank calls it).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from visionflow.model import engine, optimizers
from visionflow.model.augment_ops import AugmentPolicy, augment_batch, mix_batch
from visionflow.model.zoo import FastNet, dirac_init, init_whitening

WHITEN_IMAGES = 5000  # images whose 2x2 patches set a `fast` net's whitening conv


@dataclass(kw_only=True)
class Recipe:
    """How to train: the `train:` section of params.yaml (see `from_params`).

    No defaults here: `TrainConfig` (config.py) holds them; build one with `from_params`.
    """

    epochs: float
    batch_size: int
    lr: float
    optimizer: str
    momentum: float
    muon_lr: float
    muon_momentum: float
    weight_decay: float
    decay_biases: bool
    bias_lr_scale: float
    label_smoothing: float
    schedule: str
    warmup_epochs: float
    warmup_start: float
    lr_end: float
    grad_clip: float | None
    ema_decay: float | None
    ema_every: int
    ema_ramp: float
    lookahead: bool
    whiten_bias_epochs: int | None
    dirac_init: bool
    freeze_epochs: int
    backbone_lr_mult: float
    amp: bool
    channels_last: bool
    compile: bool | str  # true, false or "auto" (on CUDA)
    log_every: int = 10  # steps between progress reads (not a params key)

    @classmethod
    def from_params(cls, train: Mapping[str, Any] | Any, **extra: Any) -> Recipe:
        """From a params `train:` section (a dict or `TrainConfig`): the keys named here;
        `extra` overrides them or sets the others (`log_every`)."""
        get = train.get if isinstance(train, Mapping) else lambda k: getattr(train, k)
        names = [f.name for f in fields(cls)]
        have = train.keys() if isinstance(train, Mapping) else type(train).model_fields
        return cls(**{**{n: get(n) for n in names if n in have}, **extra})


@dataclass
class EpochEnd:
    """What an epoch callback sees (see the module docstring)."""

    epoch: int
    epochs: int
    step: int
    steps: int
    train_loss: float
    train_top1: float
    seconds: float
    train_seconds: float
    images: int
    lr: float
    model: nn.Module
    run: FitRun
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class FitResult:
    model: nn.Module  # the trained model to use (the EMA average when EMA is on)
    epochs_run: int
    steps: int
    train_seconds: float  # the timed window: whitening + training steps
    images: int  # training images seen, all ranks
    history: list[dict[str, Any]]  # per epoch: the EpochEnd numbers plus callback metrics


Callback = Callable[[EpochEnd], bool | None]
ProgressFn = Callable[[int, dict[str, float]], None]
StepFn = Callable[["FitRun"], None]  # after every step (a mid-epoch checkpoint)


class Stream(Protocol):
    """Batches from outside the device (`data.stream.ShardStream`, duck-typed): uint8
    N×C×S×S images, or a list of encoded images for `FitRun`'s `decode`, and labels."""

    def __len__(self) -> int: ...  # batches per epoch on this rank
    def epoch(self, limit: int | None = None) -> Iterator[tuple[Any, torch.Tensor]]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def start_after(self, epochs_done: int) -> None: ...


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


class FitRun:
    """One training run; construct, optionally `load_state_dict` (resume), then `run`."""

    def __init__(self, model: nn.Module, train_x: torch.Tensor, train_y: torch.Tensor,
                 recipe: Recipe, policy: AugmentPolicy, *, num_classes: int,
                 device: torch.device | str, seed: int = 0, dist: engine.Dist | None = None,
                 backbone: set[str] | None = None, whiten: bool = True,
                 stream: Stream | None = None,
                 decode: Callable[[list[torch.Tensor], int, int], torch.Tensor] | None = None
                 ) -> None:
        """With `stream`, batches come from it and `train_x` is only a sample of the images
        (whitening, compile warm-up); `decode(encoded, epoch, step)` turns a batch of encoded
        images into uint8 images on the device (the GPU decoder)."""
        self.r, self.policy, self.num_classes = recipe, policy, num_classes
        self.stream, self.decode = stream, decode
        self.device = torch.device(device)
        self.dist = dist or engine.Dist()
        self.backbone = backbone or set()
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = not torch.are_deterministic_algorithms_enabled()
        self.x, self.y = train_x, train_y
        fmt = torch.channels_last if recipe.channels_last else torch.preserve_format
        self.model = model.to(self.device, memory_format=fmt)
        net = getattr(self.model, "net", self.model)
        self.whiten_net = net if whiten and isinstance(net, FastNet) and not self.backbone else None
        if self.whiten_net is not None:
            self.whiten_net.whiten.weight.requires_grad_(False)  # set from data, then fixed
        self.whiten_bias = net.whiten.bias if isinstance(net, FastNet) else None

        world_batch = recipe.batch_size * self.dist.world
        self.steps_per_epoch = max(1, len(stream) if stream is not None
                                   else len(train_x) // world_batch)
        self.total = max(1, math.ceil(recipe.epochs * self.steps_per_epoch))
        self.epochs = math.ceil(self.total / self.steps_per_epoch)
        self.optimizer = optimizers.make_optimizer(self.model, recipe, self.backbone)
        warmup = int(recipe.warmup_epochs * self.steps_per_epoch)
        wb = (recipe.whiten_bias_epochs or 0) * self.steps_per_epoch  # Muon's whitening bias

        def factor(s: int) -> float:
            return engine.lr_factor(s, self.total, warmup, recipe.schedule, recipe.warmup_start,
                                    recipe.lr_end)

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, [
            (lambda s: max(0.0, 1 - s / wb)) if wb and g.get("whiten_bias") else factor
            for g in self.optimizer.param_groups])
        self.scaler = engine.make_scaler(self.device, recipe.amp)
        self.ema = engine.make_ema(self.model, recipe.ema_decay, recipe.ema_every,
                                   recipe.ema_ramp, recipe.lookahead)
        self.gens = {  # the permutation is shared by all ranks; augmentation differs per rank
            "perm": torch.Generator(device=train_x.device).manual_seed(seed),
            "aug": torch.Generator(device=self.device).manual_seed(seed + 1000 * self.dist.rank),
        }
        self.flip0 = None  # alternating flip: a fixed random half, then all flipped each epoch
        if getattr(policy, "alternate_flip", False) and policy.hflip > 0 and stream is None:
            g = torch.Generator(device=train_x.device).manual_seed(seed + 1)
            self.flip0 = torch.rand(len(train_x), generator=g, device=train_x.device) \
                < policy.hflip
        self.step_model: nn.Module = self.model
        if self.dist.enabled:
            self.step_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.compiled = optimizers.compile_on(recipe.compile, self.device)
        if self.compiled:
            self.step_model = torch.compile(self.step_model)
        self.epoch, self.step = 0, 0

    # --- state ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs, loadable with `torch.load(weights_only=True)`; `ranks`:
        each rank's generators and loader position (under DDP a collective: every rank calls
        it at the same step; `load_state_dict` gives each rank its own back)."""
        own = {"gens": {k: g.get_state() for k, g in self.gens.items()},
               "rng_cpu": torch.get_rng_state(),
               "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
               # mid-epoch: where the stream stopped (at an epoch end the next starts afresh)
               "stream": self.stream.state_dict()
               if self.stream is not None and self._in_epoch() else None}
        return {"epoch": self.epoch, "step": self.step, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "ranks": engine.gather_objects(self.dist, own)}

    def _in_epoch(self) -> int:
        """Steps already taken in the current epoch."""
        return self.step - self.epoch * self.steps_per_epoch

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        ranks = state.get("ranks") or [state]  # a checkpoint from before `ranks`: one part
        own = ranks[self.dist.rank] if len(ranks) == self.dist.world else ranks[0]
        for k, g in self.gens.items():
            g.set_state(own["gens"][k])
        torch.set_rng_state(own["rng_cpu"])
        if own["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(own["rng_cuda"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        if self.stream is not None:
            if own.get("stream") is not None and self._in_epoch():
                self.stream.load_state_dict(own["stream"])
            else:
                self.stream.start_after(self.epoch)

    @property
    def eval_model(self) -> nn.Module:
        if self.ema is not None and not self.ema.lookahead:
            return self.ema.module
        return self.model

    # --- the loop ------------------------------------------------------------------------

    def run(self, callbacks: Sequence[Callback] = (),
            progress: ProgressFn | None = None, on_step: StepFn | None = None) -> FitResult:
        if self.compiled and self.step < self.total:
            self._warm_up()
        _sync(self.device)
        t0 = time.perf_counter()
        if self.step == 0 and self.whiten_net is not None:
            self._whiten()  # (and Dirac init): part of the timed window, as in the records
        history: list[dict[str, Any]] = []
        train_seconds, images = 0.0, 0
        while self.epoch < self.epochs and self.step < self.total:
            loss_sum, correct, seen = self._epoch(progress, t0, on_step)
            _sync(self.device)
            dt = time.perf_counter() - t0
            train_seconds += dt
            images += seen * self.dist.world
            self.epoch += 1
            if self.step >= self.total and self.ema is not None:
                self.ema.finish()
            e = EpochEnd(self.epoch, self.epochs, self.step, self.total,
                         float(loss_sum) / max(1, seen), int(correct) / max(1, seen), dt,
                         train_seconds, seen * self.dist.world,
                         self.optimizer.param_groups[0]["lr"], self.eval_model, self)
            stop = any([bool(cb(e)) for cb in callbacks])  # every callback runs
            if self.dist.enabled:
                stop = engine.broadcast_flag(stop, self.device)
            history.append({k: v for k, v in vars(e).items()
                            if k not in ("model", "run", "metrics")} | e.metrics)
            self.model.train()
            _sync(self.device)
            t0 = time.perf_counter()
            if stop:
                break
        if self.ema is not None:
            self.ema.finish()
        return FitResult(self.eval_model, self.epoch, self.step, train_seconds, images, history)

    def _whiten(self) -> None:
        if self.r.dirac_init:
            dirac_init(self.whiten_net)
        step = max(1, len(self.x) // WHITEN_IMAGES)  # spread over the set (caches sort by class)
        x = self.x[::step][:WHITEN_IMAGES].to(self.device, non_blocking=True).float().div_(255)
        if hasattr(self.model, "mean"):  # a Classifier normalises before its net
            x = (x - self.model.mean) / self.model.std
        init_whitening(self.whiten_net, x)
        if self.ema is not None:
            self.ema.copy_from_model()

    def _batch(self, idx: torch.Tensor | None, streamed: tuple[Any, torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if streamed is not None:
            xb, yb = streamed
            if isinstance(xb, list):  # encoded: decoded on the device
                assert self.decode is not None, "a stream of encoded images needs `decode`"
                xb = self.decode(xb, self.epoch, self.step)
            xb = xb.to(self.device, non_blocking=True)
            yb = yb.to(self.device, non_blocking=True)
        else:
            xb = self.x[idx].to(self.device, non_blocking=True)
            yb = self.y[idx].to(self.device, non_blocking=True)
        flip = None
        if self.flip0 is not None and idx is not None:
            flip = self.flip0[idx].to(self.device, non_blocking=True)
            if self.epoch % 2:
                flip = ~flip
        xb = augment_batch(xb, self.policy, self.gens["aug"], flip=flip)
        target = yb
        if self.policy.mix_p > 0:
            xb, target = mix_batch(xb, yb, self.num_classes, self.policy, self.gens["aug"])
        if self.r.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        return xb, yb, target

    def _frozen(self) -> list[nn.Parameter]:
        """Parameters whose gradients are dropped this epoch (DDP-safe: requires_grad stays)."""
        out: list[nn.Parameter] = []
        if self.backbone and self.epoch < self.r.freeze_epochs:
            out += [p for n, p in self.model.named_parameters() if n in self.backbone]
        wb = self.r.whiten_bias_epochs
        if self.whiten_bias is not None and wb is not None and self.epoch >= wb:
            out.append(self.whiten_bias)
        return out

    def _batches(self, steps: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        r, d = self.r, self.dist
        if self.stream is not None:
            for streamed in self.stream.epoch(steps):
                yield self._batch(None, streamed)
            return
        perm = torch.randperm(len(self.x), device=self.x.device, generator=self.gens["perm"])
        for i in range(steps):
            start = (i * d.world + d.rank) * r.batch_size
            yield self._batch(perm[start:start + r.batch_size])

    def _epoch(self, progress: ProgressFn | None, t0: float, on_step: StepFn | None = None):
        r, d = self.r, self.dist
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        frozen = self._frozen()
        seen = 0
        done = self._in_epoch() if self.stream is not None else 0  # resumed mid-epoch
        steps = min(self.steps_per_epoch - done, self.total - self.step)
        for i, (xb, yb, target) in enumerate(self._batches(steps)):
            with engine.autocast(self.device, r.amp):
                logits = self.step_model(xb)
            loss = F.cross_entropy(logits.float(), target, label_smoothing=r.label_smoothing)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            for p in frozen:
                p.grad = None
            if r.grad_clip:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), r.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.step += 1
            if self.ema is not None:
                self.ema.update(self.step, self.total)
            n = len(yb)
            loss_sum += loss.detach() * n
            correct += (logits.argmax(1) == yb).sum()
            seen += n
            if progress is not None and (self.step % r.log_every == 0 or i == steps - 1):
                dt = max(time.perf_counter() - t0, 1e-9)  # reading the sums syncs: every N only
                progress(self.step, {"loss": float(loss_sum) / seen,
                                     "top1": int(correct) / seen, "img_per_s": seen * d.world / dt})
            if on_step is not None and self._in_epoch() < self.steps_per_epoch:
                on_step(self)
        return loss_sum, correct, seen

    def _warm_up(self) -> None:
        """Compile outside the timed window: forward + backward on one batch, then put every
        weight, buffer and generator back as it was."""
        saved = {k: v.clone() for k, v in self.model.state_dict().items()}
        gen_state = {k: g.get_state() for k, g in self.gens.items()}
        idx = torch.arange(self.r.batch_size, device=self.x.device) % len(self.x)
        xb, _, target = self._batch(idx)
        with engine.autocast(self.device, self.r.amp):
            logits = self.step_model(xb)
        F.cross_entropy(logits.float(), target).backward()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.load_state_dict(saved)
        for k, g in self.gens.items():
            g.set_state(gen_state[k])
        _sync(self.device)


def fit(model: nn.Module, train_x: torch.Tensor, train_y: torch.Tensor, recipe: Recipe,
        policy: AugmentPolicy, *, num_classes: int, device: torch.device | str, seed: int = 0,
        callbacks: Sequence[Callback] = (), progress: ProgressFn | None = None,
        **kwargs: Any) -> FitResult:
    """Train `model` in place; `kwargs` go to `FitRun` (dist, backbone, whiten)."""
    run = FitRun(model, train_x, train_y, recipe, policy, num_classes=num_classes,
                 device=device, seed=seed, **kwargs)
    return run.run(callbacks, progress)
