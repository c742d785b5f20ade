"""What every variant builder shares: the original model, the data, the options, and how a
variant is scored against the original.

Every variant is scored on the test split by `model.inference.model_logits` (with the
original's softmax temperature and `evaluate.tta`) and `model.metrics.score_logits`, on the
CPU: the same two functions the evaluate and register stages use. Fine-tuning and
distillation run on `device` (the GPU when there is one) on the train split or a seeded
subset of it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visionflow.compression.distill import distill, finetune
from visionflow.compression.measure import count_macs, count_params, model_size_bytes
from visionflow.core.config import CompressConfig, EvaluateConfig
from visionflow.model.classifier import Arch
from visionflow.model.inference import model_logits, predict_logits
from visionflow.model.metrics import headline, score_logits

RELOAD_CHECK_IMAGES = 64  # test images a reloaded file must reproduce


class Measures:
    """Structure and file size of a variant, as ratios to the original's row (`base`) once
    it is set; shared by the classification and segmentation contexts."""

    base: dict[str, Any]
    shape: tuple[int, ...]

    def structure(self, model: nn.Module) -> dict[str, Any]:
        params, macs = count_params(model), count_macs(model, self.shape)
        out: dict[str, Any] = {"params": params, "macs": macs}
        if self.base:
            out["param_ratio"] = round(params / self.base["params"], 4)
            out["mac_ratio"] = round(macs / self.base["macs"], 4)
        return out

    def sized(self, path: Path) -> dict[str, Any]:
        size = model_size_bytes(path)
        out: dict[str, Any] = {"size_bytes": size}
        if self.base:
            out["size_ratio"] = round(size / self.base["size_bytes"], 4)
        return out


@dataclass
class Context(Measures):
    """The original (fp32, CPU), the packed data's uint8 splits, the options, and the
    original's scores once `set_original` has run (every ratio and drop is against them)."""

    model: nn.Module
    arch: Arch
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    cfg: CompressConfig
    evaluate: EvaluateConfig
    seed: int
    device: torch.device  # fine-tuning and distillation; everything else on the CPU
    out: Path  # the folder variant files are written to
    base: dict[str, Any] = field(default_factory=dict)  # the original's entry
    base_pred: torch.Tensor | None = None  # the original's test-split predictions
    _calib: torch.Tensor | None = field(default=None, repr=False)
    _ft: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = field(
        default=None, repr=False)

    def __post_init__(self) -> None:
        self.example = self.test_x[:1].float().div(255)  # one image, for export and tracing
        self.shape = tuple(self.example.shape)

    def set_original(self, entry: dict[str, Any], logits: torch.Tensor) -> None:
        self.base, self.base_pred = dict(entry), logits.argmax(1)

    # ------------------------------------------------------------------ scoring
    def logits(self, model: nn.Module) -> torch.Tensor:
        ev = self.evaluate
        return model_logits(model, self.test_x, ev.batch_size, "cpu", ev.tta,
                            self.arch.temperature)  # the parent's calibration for every variant

    def metrics(self, logits: torch.Tensor) -> dict[str, Any]:
        ev = self.evaluate
        scores = score_logits(logits, self.test_y, self.arch.classes, ev.topk,
                              ev.calibration_bins)
        out = {"n": scores["n"], **headline(scores)}
        if self.base:
            out["top1_drop"] = round(self.base["top1"] - out["top1"], 6)
            out["top1_drop_points"] = round(100 * (self.base["top1"] - out["top1"]), 4)
        else:
            out["top1_drop"], out["top1_drop_points"] = 0.0, 0.0
        return out

    def agreement(self, logits: torch.Tensor, other: torch.Tensor | None = None) -> float:
        """Top-1 agreement with `other`'s predictions (default: the original's)."""
        ref = self.base_pred if other is None else other.argmax(1)
        return round(float((logits.argmax(1) == ref).float().mean()), 6)


    @torch.inference_mode()
    def same_outputs(self, a: nn.Module, b: nn.Module) -> bool:
        """`a` and `b` (a reloaded file) give the same logits on the first test images."""
        x = self.test_x[:RELOAD_CHECK_IMAGES]
        return torch.allclose(predict_logits(a, x), predict_logits(b, x), rtol=1e-4, atol=1e-5)

    # ------------------------------------------------------------------ data
    def calibration(self) -> torch.Tensor:
        """A seeded train subset, uint8 (both int8 paths scale it)."""
        if self._calib is None:
            g = torch.Generator().manual_seed(self.seed)
            idx = torch.randperm(len(self.train_x), generator=g)[: self.cfg.calibration_images]
            self._calib = self.train_x[idx]
        return self._calib

    def finetune_data(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(x uint8, y, teacher logits or None): the train split (or a seeded subset) and the
        original's logits on it, computed once for every distilled fine-tune."""
        if self._ft is None:
            x, y = self.train_x, self.train_y
            n = self.cfg.finetune_images
            if n is not None and n < len(x):
                g = torch.Generator().manual_seed(self.seed + 1)
                idx = torch.randperm(len(x), generator=g)[:n]
                x, y = x[idx], y[idx]
            if not isinstance(x, torch.Tensor):  # a streamed split, smaller than the subset
                x = x[:]
            teacher = None
            if self.cfg.finetune_distill or "distill" in self.cfg.methods:
                with on_device(self.model, self.device) as model:
                    teacher = predict_logits(model, x)
            self._ft = (x, y, teacher)
        return self._ft

    def recover(self, model: nn.Module, seed: int) -> list[dict[str, Any]]:
        """The short fine-tune after a compression step (in place), distilled from the
        original when `finetune_distill`. Returns its per-epoch history."""
        cfg = self.cfg
        if cfg.finetune_epochs == 0:
            return []
        x, y, teacher = self.finetune_data()
        torch.manual_seed(seed)
        with on_device(model, self.device) as m:
            if cfg.finetune_distill:
                _, hist = distill(m, None, x, y, epochs=cfg.finetune_epochs,
                                  lr=cfg.finetune_lr, temperature=cfg.temperature,
                                  alpha=cfg.distill_alpha, batch_size=cfg.finetune_batch_size,
                                  seed=seed, teacher_logits=teacher)
            else:
                _, hist = finetune(m, x, y, epochs=cfg.finetune_epochs, lr=cfg.finetune_lr,
                                   batch_size=cfg.finetune_batch_size, seed=seed)
        return rounded(hist)


def rounded(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A training history with its floats rounded to 5 places, for the report."""
    return [{k: round(v, 5) if isinstance(v, float) else v for k, v in h.items()}
            for h in history]


@contextlib.contextmanager
def on_device(model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """`model` moved (in place) to `device` for the block, then back to the CPU."""
    try:
        yield model.to(device)
    finally:
        model.cpu()
