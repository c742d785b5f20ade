"""Optional int8 via torchao PT2E with the X86 Inductor quantizer (not a project dependency).

`torch.export` the model, insert observers (`prepare_pt2e`), calibrate, `convert_pt2e`. The
result is a reference int8 graph (quantize / dequantize around fp32 ops): run it under
`torch.compile` so Inductor fuses it into oneDNN int8 kernels. It is not saved: re-derive it
from the fp32 checkpoint and a calibration subset.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def torchao_available() -> bool:
    try:
        import torchao.quantization.pt2e.quantize_pt2e  # noqa: F401
    except ImportError:
        return False
    return True


def quantize_pt2e_x86(
    model: nn.Module, calib_images: torch.Tensor, batch_size: int = 32
) -> torch.fx.GraphModule:
    """Static int8 (per-channel weights, per-tensor activations) of `model` with a dynamic
    batch dim; `calib_images` are N x C x H x W float in [0, 1]."""
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    model = copy.deepcopy(model).cpu().eval()
    example = calib_images[:2].float()
    batch = torch.export.Dim("batch", min=1)
    graph = torch.export.export(model, (example,), dynamic_shapes=({0: batch},)).module()
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for i in range(0, len(calib_images), batch_size):
            prepared(calib_images[i : i + batch_size].float())
    converted = convert_pt2e(prepared)
    move_exported_model_to_eval(converted)
    return converted
