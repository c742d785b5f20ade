"""The segmentation training loop and evaluation (torch only), what the train stage calls:
fixed-size uint8 batches -> joint augmentation on the device -> cross-entropy with the ignore
index -> AdamW with a cosine schedule. Under torchrun (`dist`) each rank trains a DDP replica
on its own part of every epoch. After each epoch, and every `save_every` steps within one, the
loop hands its state (model, optimizer, schedule, where in the epoch it is) to a `save`
callback; given that state back as `start`, it goes on from the next batch as if it had not
stopped (each epoch's order is drawn from (seed, epoch), each step's augmentation from (seed,
rank, epoch, step)). Evaluation runs each image at its own size (the models take any H x W)
and accumulates the pixel confusion matrix, so memory does not grow with the number of images.
`recalibrate_bn` sets BatchNorm's statistics from train images before a model is evaluated.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.swa_utils import update_bn

from visionflow.model.engine import Dist, collective_device, gather_objects
from visionflow.model.segmentation import IGNORE_INDEX
from visionflow.model.segmentation_augment import JointPolicy, joint_augment
from visionflow.model.segmentation_metrics import (
    SegmentationMeter,
    SegmentationScores,
    per_image_iou,
)


def resize_pair(image: Tensor, mask: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """C x H x W uint8 image (bilinear, antialiased) and H x W mask (nearest) at `size`."""
    x = F.interpolate(image[None].float(), size=size, mode="bilinear", antialias=True,
                      align_corners=False)
    y = F.interpolate(mask[None, None].float(), size=size, mode="nearest-exact")
    return x[0].round().clamp(0, 255).to(torch.uint8), y[0, 0].to(torch.int64)


class Batches(Protocol):
    """Epoch `number`'s (1, 2, ...) batches after its first `done` ones. A source whose
    position cannot be recomputed from (number, done), a data loader's, also has
    `state_dict()` (every rank's is saved with a mid-epoch checkpoint) and `load_state_dict()`
    (each rank gets its own back before the resumed epoch)."""

    def __call__(self, number: int, done: int = 0) -> Iterable[tuple[Tensor, Tensor]]: ...


FitState = dict[str, Any]  # `fit_segmenter_on`'s state (torch.save-able)
EpochEnd = Callable[[int, float, float, int], None]  # (epoch, mean loss, seconds, images)


def fit_segmenter(model: nn.Module, images: Tensor, masks: Tensor, policy: JointPolicy, *,
                  epochs: int, batch_size: int = 32, lr: float = 3e-3,
                  weight_decay: float = 1e-4, seed: int = 0, on_epoch: EpochEnd | None = None,
                  start: FitState | None = None, save: Callable[[FitState], None] | None = None,
                  dist: Dist | None = None) -> dict:
    """Train on N x C x H x W uint8 `images` and N x H x W `masks` (on the model's device),
    in a random order drawn for each epoch from (seed, epoch); under `dist` rank r takes
    batches r, r + world, ... of it (whole ones: the last partial round is dropped). See
    `fit_segmenter_on`."""
    d = dist or Dist()
    device = next(model.parameters()).device
    images, masks = images.to(device), masks.to(device)
    n = len(images)
    steps = fit_steps(n, batch_size, d)

    def epoch(number: int, done: int = 0) -> Iterable[tuple[Tensor, Tensor]]:
        for idx in islice(epoch_indices(n, batch_size, seed, number, d), done, None):
            idx = idx.to(device)
            yield images[idx], masks[idx]
    return fit_segmenter_on(model, epoch, steps, policy, epochs=epochs, lr=lr,
                            weight_decay=weight_decay, seed=seed, on_epoch=on_epoch,
                            start=start, save=save, dist=d)


def epoch_indices(n: int, batch_size: int, seed: int, number: int,
                  dist: Dist) -> Iterator[Tensor]:
    """This rank's batches of pair indices in epoch `number`: a permutation drawn from (seed,
    epoch), batch i of it going to rank i mod world."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(hash((seed, number))
                                                                      % 2**62))
    for i in range(fit_steps(n, batch_size, dist)):
        yield order[(i * dist.world + dist.rank) * batch_size:][:batch_size]


def fit_steps(n: int, batch_size: int, dist: Dist) -> int:
    """Batches an epoch of `n` pairs gives each rank (`fit_segmenter`); on one rank a last
    batch of one pair is left out (a BatchNorm after a global pooling, DeepLabV3's, cannot
    take one; the order changes every epoch, so it is another pair each time)."""
    if dist.world == 1:
        return n // batch_size if n % batch_size == 1 and n > 1 else math.ceil(n / batch_size)
    if n < batch_size * dist.world:
        raise ValueError(f"{n} train pairs cannot give each of {dist.world} processes a "
                         f"batch of {batch_size}")
    return n // (batch_size * dist.world)


def fit_segmenter_on(model: nn.Module, batches: Batches, steps_per_epoch: int,
                     policy: JointPolicy, *, epochs: int, lr: float = 3e-3,
                     weight_decay: float = 1e-4, seed: int = 0,
                     on_epoch: EpochEnd | None = None, start: FitState | None = None,
                     save: Callable[[FitState], None] | None = None, save_every: int = 0,
                     dist: Dist | None = None) -> dict:
    """Train on `batches` (uint8 image and int64 mask batches on the model's device, a fixed
    size; under `dist`, this rank's share, the same count on every rank), `steps_per_epoch`
    of them an epoch. `on_epoch(epoch, mean loss over all ranks, seconds, images)` runs after
    each epoch, outside its timed window (it may evaluate: the model is put back in training
    mode), then `save(state)`; with `save_every`, `save` also runs every that many steps
    within an epoch. `start` (such a state) resumes at the batch after it. An epoch whose
    mean loss is not a number ends the loop there, with neither callback. Returns
    {"img_per_s": training images per second over this call's epochs, all ranks,
    "epoch_seconds": their wall times, "loss": last epoch's mean loss, "seconds",
    "diverged": that epoch, or None}."""
    d = dist or Dist()
    device = next(model.parameters()).device
    steps = epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / max(steps, 1), 1.0))))
    done, loss_mean, into, loss_so_far = 0, float("nan"), 0, 0.0
    if start is not None:
        model.load_state_dict(start["model"])
        opt.load_state_dict(start["optimizer"])
        sched.load_state_dict(start["schedule"])
        done, loss_mean = start["epoch"], start["loss"]
        into, loss_so_far = start.get("step", 0), start.get("loss_so_far", 0.0)
        if into and start.get("positions"):  # shards: each rank's loader position
            batches.load_state_dict(start["positions"][d.rank])  # type: ignore[attr-defined]
    step_model = model if not d.enabled else nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    gen = torch.Generator(device=device)

    def state(epoch: int, **more: Any) -> FitState:
        return {"epoch": epoch, "loss": loss_mean, "model": model.state_dict(),
                "optimizer": opt.state_dict(), "schedule": sched.state_dict(), **more}

    model.train()
    begin, seen, epoch_seconds, diverged = time.perf_counter(), 0, [], None
    for number in range(done + 1, epochs + 1):
        first = into if number == done + 1 else 0  # batches of this epoch run before a kill
        epoch_start = time.perf_counter()
        # each rank's mean so far, so that the mean over ranks below is the epoch's
        loss_sum, n_batches = torch.tensor(loss_so_far * first, device=device), first
        ran = 0  # images this call trained on in this epoch, this rank
        for images, masks in batches(number, first):
            gen.manual_seed(hash((seed, d.rank, number, n_batches)) % 2**62)
            x, y = joint_augment(images, masks, policy, gen)
            loss = F.cross_entropy(step_model(x), y, ignore_index=IGNORE_INDEX)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum, n_batches, ran = loss_sum + loss.detach(), n_batches + 1, ran + len(x)
            if save is not None and save_every and n_batches % save_every == 0 \
                    and n_batches < steps_per_epoch:
                paused = time.perf_counter()
                position = getattr(batches, "state_dict", None)
                save(state(number - 1, step=n_batches,
                           loss_so_far=_mean_over_ranks(loss_sum, n_batches, d, device),
                           positions=gather_objects(d, position()) if position else None))
                pause = time.perf_counter() - paused
                epoch_start, begin = epoch_start + pause, begin + pause
        loss_mean = _mean_over_ranks(loss_sum, n_batches, d, device)  # waits for the device
        epoch_seconds.append(time.perf_counter() - epoch_start)
        if not math.isfinite(loss_mean):  # the same mean on every rank: all stop here,
            diverged = number  # before the callback and the checkpoint of broken weights
            break
        seen, paused = seen + ran, time.perf_counter()
        if on_epoch is not None:
            on_epoch(number, loss_mean, epoch_seconds[-1], ran * d.world)
            model.train()
        if save is not None:
            save(state(number))
        begin += time.perf_counter() - paused
    elapsed = time.perf_counter() - begin
    return {"img_per_s": seen * d.world / max(elapsed, 1e-9), "epoch_seconds": epoch_seconds,
            "loss": loss_mean, "seconds": elapsed, "diverged": diverged}


def _mean_over_ranks(loss_sum: Tensor, n_batches: int, d: Dist, device: torch.device) -> float:
    if not d.enabled:
        return float(loss_sum) / max(n_batches, 1)
    import torch.distributed as tdist

    t = torch.stack([loss_sum.float(), torch.tensor(float(n_batches), device=device)])
    t = t.to(collective_device(tdist.get_backend(), device))
    tdist.all_reduce(t)
    return float(t[0] / t[1].clamp(min=1))


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]],
                   policy: JointPolicy, seed: int) -> None:
    """Precise BatchNorm: each BatchNorm layer's running mean and variance set to their
    average over `batches` (uint8 images and int64 masks at the training size, augmented as
    in training by a generator from `seed`) with the current weights (`update_bn`); the
    weights and the training mode are left as they were. A running average lags the weights:
    at torchvision MobileNetV3's momentum of 0.01 a few epochs leave the statistics mostly at
    their starting values, and the model in eval mode answered background everywhere
    (BENCHMARKS, "Precise BatchNorm"; unaugmented images cost a U-Net one mIoU point there)."""
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        device = next(model.parameters()).device
        gen = torch.Generator(device=device).manual_seed(seed)
        update_bn((joint_augment(x.to(device), y.to(device), policy, gen)[0]
                   for x, y in batches), model)


@torch.no_grad()
def evaluate_segmenter(model: nn.Module, pairs: Iterable[tuple[Tensor, Tensor]],
                       num_classes: int) -> tuple[SegmentationScores, list[float]]:
    """Scores over (C x H x W uint8 image, H x W mask) pairs of any sizes, and the per-image
    mIoU list (for the paired test)."""
    device = next(model.parameters()).device
    model.eval()
    meter, per_image = SegmentationMeter(num_classes), []
    for image, mask in pairs:
        x = image[None].to(device).float().div_(255)
        y = mask[None].to(device)
        logits = model(x)
        meter.update(logits, y)
        per_image.append(float(per_image_iou(logits, y, num_classes)[0]))
    return meter.compute(), per_image
