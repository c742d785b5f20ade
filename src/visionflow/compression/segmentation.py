"""Compressed variants of a segmenter (float N x C x H x W in [0, 1] -> N x K x H x W logits,
any H x W), scored by mIoU on test pairs at their own sizes (#19).

- `onnx_fp32`: the original exported with a dynamic batch, height and width (reference row);
- `int8`: ONNX Runtime static QDQ int8 of that export (per-channel weights; the 1x1 head
  stays fp32: int8 logits flip close pixels, -4 mIoU points on a small U-Net), calibrated on
  train images resized to one side;
- `structured<r>`: channel pruning with torch-pruning's dependency graph (the 1x1 head keeps
  its classes; U-Net skip concatenations are followed by the graph), a short fine-tune
  (`fit_segmenter`, then `recalibrate_bn` on the calibration images) after each step, saved
  as layer structure + state dict with the task, deployed as its ONNX export when ORT and
  torch agree on `onnx_min_agreement` of the pixels;
- `structured<r>+int8` (`combine`): int8 of each structured variant within the budget.

The rows reuse the classifiers' `Variant`, `Sweep`, latency and Pareto code; the metric is
`miou` and the budget `max_miou_drop` (mIoU points). The test pairs stream: nothing holds
the split in memory; train images are bounded by `calibration_images` / `finetune_images`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from visionflow.compression.context import Measures
from visionflow.compression.measure import (
    eager_runner,
    ort_runner,
)
from visionflow.compression.onnx_export import OrtModule, export_onnx
from visionflow.compression.prune import structured_prune
from visionflow.compression.quantize import quantize_int8_onnx
from visionflow.compression.structure import load_structured, save_structured
from visionflow.compression.sweep import Sweep
from visionflow.compression.variants import Variant
from visionflow.core.config import CompressConfig
from visionflow.model.segmentation import TASK, SegArch, build_segmenter
from visionflow.model.segmentation_augment import JointPolicy
from visionflow.model.segmentation_fit import fit_segmenter, recalibrate_bn
from visionflow.model.segmentation_metrics import SegmentationMeter

Pairs = Callable[[], Iterable[tuple[Tensor, Tensor]]]  # a fresh pass over the test pairs


@dataclass
class SegContext(Measures):
    """The original (fp32, CPU), the data, the options; `base` is the original's row."""

    model: nn.Module
    arch: SegArch
    test_pairs: Pairs
    train_images: Tensor  # N x C x S x S uint8: calibration and fine-tuning (bounded)
    train_masks: Tensor  # N x S x S int64
    cfg: CompressConfig
    seed: int
    device: torch.device  # fine-tuning; scoring and export on the CPU
    out: Path
    base: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.example = self.train_images[:1].float().div(255)
        self.shape = tuple(self.example.shape)

    @torch.inference_mode()
    def score(self, model: nn.Module, **references: nn.Module) -> dict[str, Any]:
        """mIoU, pixel accuracy, mean Dice over the test pairs (each at its own size), the
        drop against the original, and for each `references` name the fraction of pixels
        whose predicted class agrees with that model's (`<name>` key)."""
        meter = SegmentationMeter(self.arch.num_classes)
        same = dict.fromkeys(references, 0)
        total = n = 0
        for image, mask in self.test_pairs():
            x = image[None].float().div(255)
            pred = model(x).argmax(1)
            meter.update(pred, mask[None])
            for key, ref in references.items():
                same[key] += int((ref(x).argmax(1) == pred).sum())
            total, n = total + pred.numel(), n + 1
        s = meter.compute()
        out: dict[str, Any] = {"n": n, "miou": round(s.miou, 6),
                               "pixel_accuracy": round(s.pixel_accuracy, 6),
                               "mean_dice": round(s.mean_dice, 6)}
        base = self.base.get("miou", out["miou"])
        out["miou_drop_points"] = round(100 * (base - out["miou"]), 4)
        out.update({key: round(v / max(total, 1), 6) for key, v in same.items()})
        return out


    def calibration_index(self) -> Tensor:
        g = torch.Generator().manual_seed(self.seed)
        return torch.randperm(len(self.train_images), generator=g)[:self.cfg.calibration_images]

    def calibration(self) -> Tensor:
        return self.train_images[self.calibration_index()]

    def recover(self, model: nn.Module, seed: int) -> dict[str, Any] | None:
        """The short fine-tune after a pruning step (in place, on `device`)."""
        cfg = self.cfg
        if cfg.finetune_epochs == 0:
            return None
        side = tuple(self.train_images.shape[-2:])
        policy = JointPolicy(out_size=side, scale=(0.5, 1.2), hflip=0.5)
        try:
            run = fit_segmenter(model.to(self.device), self.train_images, self.train_masks,
                                policy, epochs=cfg.finetune_epochs,
                                batch_size=cfg.finetune_batch_size, lr=cfg.finetune_lr,
                                seed=seed)
            pick = self.calibration_index()
            step = max(cfg.finetune_batch_size, 2)
            recalibrate_bn(model, zip(self.train_images[pick].split(step),
                                      self.train_masks[pick].split(step), strict=True),
                           policy, seed)
        finally:
            model.cpu().eval()
        return {"loss": round(run["loss"], 5), "seconds": round(run["seconds"], 2)}


def original_variant(ctx: SegContext, file: Path) -> Variant:
    entry = {"file": file.name, "format": "torch fp32", **ctx.score(ctx.model),
             **ctx.sized(file), **ctx.structure(ctx.model), "size_ratio": 1.0,
             "param_ratio": 1.0, "mac_ratio": 1.0, "pixel_agreement_with_fp32": 1.0,
             "deployable": True, "candidate": False}
    ctx.base = dict(entry)
    return Variant("original", "original", [], entry, model=ctx.model,
                   runners={"torch": eager_runner(ctx.model)})


def onnx_reference(ctx: SegContext) -> Variant:
    src = export_onnx(ctx.model, ctx.example, ctx.out / "model_fp32.onnx", dynamic_hw=True)
    entry = {"file": src.name, "format": "onnx fp32 (the original, exported; any size)",
             **ctx.score(OrtModule(src), pixel_agreement_with_fp32=ctx.model), **ctx.sized(src),
             **{k: ctx.base[k] for k in ("params", "macs")}, "param_ratio": 1.0,
             "mac_ratio": 1.0, "deployable": True, "candidate": False}
    return Variant("onnx_fp32", "onnx", [{"method": "onnx_export"}], entry, onnx=src,
                   runners={"onnx": ort_runner(src)}, runtime="onnx")


def int8_variant(ctx: SegContext, base: Variant, src: Path) -> Variant:
    """ORT QDQ int8 of `src` (`base`'s fp32 ONNX file)."""
    t0 = time.perf_counter()
    original = base.family in ("original", "onnx")
    name = "int8" if original else f"{base.name}+int8"
    path = ctx.out / ("model_int8.onnx" if original else f"{name}.onnx")
    calib, keep = ctx.calibration(), ctx.cfg.int8_keep_first_conv
    quantize_int8_onnx(src, calib, path, keep_first_conv=keep, keep_last_conv=True)
    step = {"method": "int8", "format": "onnx qdq", "per_channel": True, "fp32_head": True,
            "calibration_images": len(calib), "calibration_side": int(calib.shape[-1]),
            "first_conv_fp32": keep}
    entry = {"file": path.name, "format": "onnx int8 QDQ per-channel (any size)",
             **ctx.score(OrtModule(path), pixel_agreement_with_fp32=ctx.model), **ctx.sized(path),
             **{k: base.entry[k] for k in ("params", "macs")},
             "param_ratio": base.entry.get("param_ratio", 1.0),
             "mac_ratio": base.entry.get("mac_ratio", 1.0),
             "deployable": True, "candidate": True,
             "seconds": round(time.perf_counter() - t0, 2)}
    family = "int8" if original else f"{base.family}+int8"
    return Variant(name, family, [*base.recipe, step], entry, onnx=path,
                   runners={"onnx": ort_runner(path)}, runtime="onnx")


def build_segmenter_from(arch: dict[str, Any]) -> nn.Module:
    """`load_structured`'s builder for segmenters (the saved arch is a `SegArch` dict)."""
    return build_segmenter(SegArch(**arch))


def structured_variant(ctx: SegContext, ratio: float) -> Variant:
    t0 = time.perf_counter()
    cfg = ctx.cfg
    name = f"structured{ratio * 100:g}"
    history: list[dict[str, Any]] = []

    def between(model: nn.Module, step: int) -> None:
        h = ctx.recover(model, ctx.seed + step)
        if h:
            history.append({"step": step + 1, **h})

    pruned = structured_prune(ctx.model, ctx.example, ratio, cfg.structured_steps,
                              between_steps=between).eval()
    recipe = [{"method": "structured", "ratio": ratio, "steps": cfg.structured_steps,
               "importance": "L2 magnitude", "finetune_epochs": cfg.finetune_epochs}]
    path = ctx.out / f"{name}.pt"
    save_structured(path, pruned, asdict(ctx.arch), task=TASK, recipe=recipe)
    reloaded = load_structured(path, build_segmenter_from)
    x = ctx.example
    with torch.inference_mode():
        reload_ok = torch.allclose(pruned(x), reloaded(x), rtol=1e-4, atol=1e-5)
    onnx = export_onnx(pruned, ctx.example, ctx.out / f"{name}.onnx", dynamic_hw=True)
    scores = ctx.score(OrtModule(onnx), pixel_agreement_with_fp32=ctx.model,
                       onnx_agreement=pruned)  # ORT vs torch, pixel by pixel
    agree = scores["onnx_agreement"]
    ok = reload_ok and agree >= cfg.onnx_min_agreement
    entry = {"file": onnx.name, "torch_file": path.name,
             "format": "torch fp32, channel-pruned, ONNX (any size)", **scores,
             **ctx.sized(onnx), **ctx.structure(pruned), "reload_ok": reload_ok,
             "onnx_ok": ok, "deployable": ok, "candidate": True,
             "expected_mac_ratio": round((1 - ratio) ** 2, 4), "finetune": history,
             "seconds": round(time.perf_counter() - t0, 2)}
    return Variant(name, "structured", recipe, entry, model=pruned, onnx=onnx,
                   runners={"torch": eager_runner(pruned), "onnx": ort_runner(onnx)},
                   runtime="onnx")


def build_segmentation_variants(ctx: SegContext, model_file: Path) -> Sweep:
    """The original, its ONNX export, then per `methods`: int8, structured strengths
    (mildest first, stopping after a miss when `stop_at_first_miss`), and with `combine`
    int8 on each structured variant within `max_miou_drop`. Other methods are skipped."""
    cfg, sweep = ctx.cfg, Sweep()
    sweep.add(original_variant(ctx, model_file))
    ref = sweep.attempt("onnx_fp32", lambda: onnx_reference(ctx))
    if "int8" in cfg.methods and ref is not None:
        sweep.attempt("int8", lambda: int8_variant(ctx, ref, ref.onnx))
    fits: list[Variant] = []
    if "structured" in cfg.methods:
        for ratio in cfg.structured_ratios:
            v = sweep.attempt(f"structured{ratio * 100:g}",
                              lambda r=ratio: structured_variant(ctx, r))
            inside = v is not None and v.entry["miou_drop_points"] <= cfg.max_miou_drop + 1e-9
            if inside and v.entry["deployable"]:
                fits.append(v)
            if not inside and cfg.stop_at_first_miss:
                break
    if cfg.combine and "int8" in cfg.methods:
        for v in fits:
            sweep.attempt(f"{v.name}+int8", lambda v=v: int8_variant(ctx, v, v.onnx))
    for method in cfg.methods:
        if method not in ("int8", "structured"):
            sweep.skip(method, "not available for segmentation models (int8 and "
                               "structured are)")
    return sweep
