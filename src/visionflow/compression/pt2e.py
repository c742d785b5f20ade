"""int8 via torchao PT2E with the X86 Inductor quantizer (the PyTorch-native CPU path).

`torch.export` the model, insert observers (`prepare_pt2e`), calibrate, `convert_pt2e`. The
result is a *reference* int8 graph (quantize / dequantize around fp32 ops): exact int8
semantics, but slower than fp32 when run as is. For speed it must be lowered to oneDNN int8
kernels: `lower_x86` (torchao's `lower_pt2e_quantized_to_x86`: freezing passes + constant
folding, for one static input shape) or `torch.compile` with Inductor `freezing=True`.

Saving: `torch.export.save` / `load` of the converted graph unpickles its weights
(`torch.export.pt2_archive` loads them with the weights-only guard off), which we never do. So
`save_recipe` stores the fp32 weights and the calibration images (tensors and plain values
only, `weights_only=True`), and `load_recipe` re-derives the int8 graph: calibration is
deterministic (MinMax observers), so the reloaded graph gives the same logits. It is not a
deployable artifact (serving it needs torchao and a lowering or compile at load time).

Models must give every ReLU call site its own module (torchvision ResNets reuse one per
block, which fails with "Input partition has more than one output node"); the project's
zoo models do.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visionflow.compression.structure import load_structured, save_structured
from visionflow.model.inference import as_input

RECIPE_FORMAT = "visionflow-pt2e-recipe-v1"


def torchao_available() -> bool:
    """Whether torchao imports; imported here first, without the warning torch logs for
    its enum on import (a deprecation of torch's own API, nothing a user can act on)."""
    pytree_log = logging.getLogger("torch.utils._pytree")
    level = pytree_log.level
    pytree_log.setLevel(logging.ERROR)
    try:
        import torchao.quantization.pt2e.quantize_pt2e  # noqa: F401
    except ImportError:
        return False
    finally:
        pytree_log.setLevel(level)
    return True


@contextlib.contextmanager
def _ptq_convert() -> Iterator[None]:
    """`convert_pt2e` without its QAT conv-BN folding pass.

    That pass matches conv -> fake-quant -> BN patterns that only `prepare_qat_pt2e` creates
    (`prepare_pt2e` already folds conv-BN); whenever a BN is left in the graph (e.g. after a
    max-pool) it still exports ~100 pattern graphs, 30-50 s on a small CPU, to find nothing.
    """
    from torchao.quantization.pt2e import quantize_pt2e as qp

    original = getattr(qp, "_fold_conv_bn_qat", None)
    if original is None:
        yield
        return
    qp._fold_conv_bn_qat = lambda m: m
    try:
        yield
    finally:
        qp._fold_conv_bn_qat = original


def first_conv_name(model: nn.Module) -> str | None:
    """Module name of the first Conv2d (the stem, which sees the raw pixels)."""
    return next((n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)


def quantize_pt2e_x86(
    model: nn.Module, calib_images: torch.Tensor, batch_size: int = 32,
    keep_first_conv: bool = False,
) -> torch.fx.GraphModule:
    """Static int8 (per-channel weights, per-tensor activations) of `model` with a dynamic
    batch dim; `calib_images` are N x C x H x W float in [0, 1] (or uint8). With
    `keep_first_conv`, the stem convolution stays fp32."""
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    model = copy.deepcopy(model).cpu().eval()
    example = as_input(calib_images[:2])
    if len(example) < 2:
        example = example[:1].repeat(2, 1, 1, 1)
    batch = torch.export.Dim("batch", min=1)
    graph = torch.export.export(model, (example,), dynamic_shapes=({0: batch},)).module()
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    first = first_conv_name(model) if keep_first_conv else None
    if first is not None:
        quantizer.set_module_name_qconfig(first, None)
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for i in range(0, len(calib_images), batch_size):
            prepared(as_input(calib_images[i : i + batch_size]))
    with _ptq_convert():
        converted = convert_pt2e(prepared)
    move_exported_model_to_eval(converted)
    return converted


def lower_x86(converted: torch.fx.GraphModule, example: torch.Tensor) -> torch.fx.GraphModule:
    """Lower a converted graph to oneDNN int8 ops for `example`'s (static) shape."""
    from torchao.quantization.pt2e.lowering import lower_pt2e_quantized_to_x86

    with torch.no_grad():
        return lower_pt2e_quantized_to_x86(converted, (as_input(example),))


def save_recipe(
    path: str | Path, model: nn.Module, arch: dict[str, Any], calib_images: torch.Tensor,
    keep_first_conv: bool = False,
) -> None:
    """Store what `load_recipe` needs to rebuild the int8 graph: the fp32 model (arch, layer
    structure, state dict) and the calibration images (uint8 when given uint8)."""
    save_structured(path, model, arch, pt2e={"format": RECIPE_FORMAT,
                                             "calibration": calib_images.detach().cpu(),
                                             "keep_first_conv": keep_first_conv})


def load_recipe(path: str | Path, build: Any = None) -> torch.fx.GraphModule:
    """Re-derive the int8 PT2E graph from `save_recipe` output (loaded with weights_only)."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    recipe = blob.get("pt2e") or {}
    if recipe.get("format") != RECIPE_FORMAT:
        raise ValueError(f"{path}: not a PT2E recipe ('{RECIPE_FORMAT}')")
    model = load_structured(path, build)
    return quantize_pt2e_x86(model, recipe["calibration"],
                             keep_first_conv=bool(recipe.get("keep_first_conv", False)))


class ExportedGraph(nn.Module):
    """An exported / lowered graph behind the plain module interface: `eval()` / `train()`
    are no-ops (exported graphs refuse them), and with `batch` a graph lowered for one static
    batch size runs any batch in chunks, the last one padded."""

    def __init__(self, graph: nn.Module, batch: int | None = None) -> None:
        super().__init__()
        self.graph, self.batch = graph, batch

    def train(self, mode: bool = True) -> ExportedGraph:
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch is None:
            return self.graph(x)
        outs = []
        for i in range(0, len(x), self.batch):
            chunk = x[i : i + self.batch]
            n = len(chunk)
            if n < self.batch:
                pad = chunk[-1:].expand(self.batch - n, *chunk.shape[1:])
                chunk = torch.cat([chunk, pad])
            outs.append(self.graph(chunk)[:n])
        return torch.cat(outs)
