"""Train for `task: segmentation`: a `segmentation.model` (U-Net by default, or torchvision's
FCN / DeepLabV3 / LR-ASPP) on the packed data's train pairs (the tensors, or streamed from
the shards: `data.segmentation_feed`), with the joint augmentation on
the training device (`model.segmentation_augment`: one crop / flip grid for image and mask,
nearest for masks, colour on the image only), cross-entropy ignoring 255, AdamW + cosine.
A checkpoint after every epoch (`outputs/train/checkpoint.pt`, for the same settings only),
and in shards mode every `train.checkpoint_steps` steps with the loader's position, lets a
killed run go on from the next batch, with the weights an unbroken run would reach. Before
each evaluation BatchNorm's statistics are set from the first `segmentation.bn_images` train
pairs, augmented, with the epoch's weights (`recalibrate_bn`, precise BN).

`train.pretrained` (a local weights file: a segmenter, a torchvision segmentation state dict
or a ResNet / MobileNetV3 backbone, read with weights_only=True) starts the matching layers,
as for classifiers. Writes `outputs/train/model.pt` with `save_segmenter` (task
"segmentation": what compress, register and predict load), `history.csv` (loss and val mIoU
per epoch) and opens the pipeline's MLflow run, as classification's train does.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from itertools import islice
from typing import Any

import mlflow
import torch

from visionflow.core.config import Params
from visionflow.core.errors import ConfigError
from visionflow.core.files import write_csv
from visionflow.core.layout import Layout
from visionflow.data.feed import is_shards
from visionflow.data.segmentation_feed import segmentation_pack, segmentation_pairs, train_batches
from visionflow.mlops.train_run import log_epoch, train_run
from visionflow.model import engine
from visionflow.model.inference import pick_device
from visionflow.model.segmentation import (
    SegArch,
    build_segmenter,
    load_segmentation_weights,
    save_segmenter,
)
from visionflow.model.segmentation_augment import JointPolicy
from visionflow.model.segmentation_fit import (
    evaluate_segmenter,
    fit_segmenter,
    fit_segmenter_on,
    fit_steps,
    recalibrate_bn,
    resize_pair,
)


def arch_for(params: Params, classes: list[str]) -> SegArch:
    s = params.segmentation
    return SegArch(s.model, len(classes), 3, classes=list(classes), kwargs=dict(s.model_kwargs))


def policy_for(params: Params) -> JointPolicy:
    s = params.segmentation
    return JointPolicy(out_size=(s.image_size, s.image_size), scale=tuple(s.crop_scale),
                       hflip=s.hflip, vflip=s.vflip, brightness=s.brightness,
                       contrast=s.contrast, saturation=s.saturation)


def bn_batches(params: Params, layout: Layout, cache: dict[str, Any]
               ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first `segmentation.bn_images` train pairs in pack's order, at the training size,
    in batches of two or more (a BatchNorm after a global pooling cannot take one image):
    what `recalibrate_bn` reads before each evaluation."""
    s = params.segmentation
    size = (s.image_size, s.image_size)
    pairs = (p if tuple(p[0].shape[-2:]) == size else resize_pair(*p, size)
             for p in segmentation_pairs(params, layout, "train", limit=s.bn_images, pack=cache))
    while len(batch := list(islice(pairs, max(s.batch_size, 2)))) > 1:
        yield torch.stack([x for x, _ in batch]), torch.stack([y for _, y in batch])


def run(params: Params, layout: Layout) -> dict[str, Any]:
    s, cfg = params.segmentation, params.train
    dist = engine.init_distributed(cfg.device)
    device = pick_device(cfg.device, dist.local_rank)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device.type == "cpu":
        engine.keep_freed_cpu_memory()
    cache = segmentation_pack(layout)
    if not cache["train_paths"]:
        raise ConfigError("segmentation: no train pairs to train on (see validate's report)")
    torch.manual_seed(params.seed)
    arch = arch_for(params, cache["classes"])
    model = build_segmenter(arch)
    if cfg.pretrained:
        if cfg.pretrained.startswith("torchvision:"):
            raise ConfigError(f"train.pretrained={cfg.pretrained!r}: segmentation takes a "
                              "local weights file (a backbone or segmenter state dict)")
        loaded = load_segmentation_weights(model, layout.root / cfg.pretrained)
        engine.say(dist, f"pretrained: {len(loaded)} tensors from {cfg.pretrained}")
    model = model.to(device)
    k = len(arch.classes)
    history: list[dict[str, Any]] = []
    n_train = len(cache["train_paths"])
    chash = params.identity("task", "seed", "data", "segmentation", "train")
    start = None
    if (resumed := engine.restore_checkpoint(layout.checkpoint, chash)) is not None:
        start, history = resumed  # every rank starts from it
        engine.say(dist, f"resuming from {layout.checkpoint} after epoch {start['epoch']}"
                         + (f", step {start['step']}" if start.get("step") else ""))

    def save(state: dict[str, Any]) -> None:  # a kill loses at most an epoch (shards: N steps)
        if dist.main:
            engine.save_checkpoint(layout.checkpoint, chash, state, history)

    def on_epoch(epoch: int, loss: float, seconds: float, images: int) -> None:
        if not dist.main:  # rank 0 alone evaluates and logs; the others wait at the next step
            return  # (DDP hands rank 0's BatchNorm statistics to them at the next step)
        if s.bn_images:
            recalibrate_bn(model, bn_batches(params, layout, cache), policy_for(params),
                           params.seed)
        miou = (evaluate_segmenter(model, segmentation_pairs(params, layout, "val", pack=cache),
                                   k)[0].miou if cache["val_paths"] else None)
        row = {"epoch": epoch, "train_loss": loss, "val_miou": miou,
               "img_per_s": images / max(seconds, 1e-9), "seconds": seconds}
        history.append(row)
        log_epoch(row)
        print(f"epoch {epoch}/{s.epochs}: loss {loss:.4f}, val mIoU "
              f"{'-' if miou is None else f'{miou:.4f}'} ({seconds:.1f} s)", flush=True)

    with train_run(params, layout, str(device), dist):
        how = dict(epochs=s.epochs, lr=s.lr, weight_decay=s.weight_decay, seed=params.seed,
                   on_epoch=on_epoch, start=start, save=save, dist=dist)
        if is_shards(cache):  # streamed: a few batches in memory (each rank its own part)
            batches = train_batches(params, layout, cache, device, dist.world)
            steps = batches.steps  # a checkpoint every train.checkpoint_steps too: see below
            fit = fit_segmenter_on(model, batches, steps, policy_for(params),
                                   save_every=cfg.checkpoint_steps, **how)
        else:
            try:
                steps = fit_steps(n_train, s.batch_size, dist)
            except ValueError as e:
                raise ConfigError(f"segmentation.batch_size={s.batch_size}: {e}") from None
            fit = fit_segmenter(model, cache["train_x"], cache["train_masks"].long(),
                                policy_for(params), batch_size=s.batch_size, **how)
        engine.check_the_loss(fit["diverged"], history, k, ("segmentation.lr", s.lr),
                              layout.checkpoint, dist, device)
        if dist.enabled:
            engine.rank_line(dist, f"{steps} batches an epoch; "
                                   f"{engine.replicas_agree(model, device)}")
        if dist.main:
            save_segmenter(layout.model, model, arch, history=json.dumps(history))
            write_csv(layout.history, history)
            mlflow.log_artifact(str(layout.history), "train")
    if dist.main:
        layout.checkpoint.unlink(missing_ok=True)
    return {"model_path": str(layout.model), "epochs_run": len(history),
            "val_miou": history[-1]["val_miou"] if history else None,
            "seconds": round(fit["seconds"], 2), "images_per_s": round(fit["img_per_s"], 1),
            "device": str(device)}
