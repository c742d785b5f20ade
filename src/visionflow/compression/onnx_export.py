"""ONNX export (torch.export / dynamo) with a dynamic batch dimension, and an ORT classifier."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from visionflow.core.files import atomic_path

INPUT_NAME = "images"
OUTPUT_NAME = "logits"


def export_onnx(
    model: nn.Module,
    example: torch.Tensor,
    path: str | Path,
    opset: int | None = None,
    check: bool = True,
) -> Path:
    """Export `model` (N x C x H x W float in [0, 1] -> logits) to a single-file ONNX model.

    Uses `torch.onnx.export(dynamo=True)`; the batch dimension is dynamic. The file is written
    to a temp name and renamed into place. With `check`, ORT output is compared to eager.
    """
    path = Path(path)
    model = copy.deepcopy(model).cpu().eval()
    x = example.detach().float().cpu()
    x = x.unsqueeze(0) if x.dim() == 3 else x
    if x.shape[0] < 2:  # a batch of 1 would let torch.export specialise the batch dim to 1
        x = x[:1].repeat(2, 1, 1, 1)
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        program = torch.onnx.export(
            model,
            (x,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            opset_version=opset,
            external_data=False,
            verbose=False,
        )
    with atomic_path(path) as tmp:
        program.save(str(tmp), external_data=False)
    if check:
        with torch.no_grad():
            want = model(x).numpy()
        got = OrtClassifier(path).predict_logits(x)
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
    return path


class OrtClassifier:
    """An ONNX classifier on the ORT CPU provider; `predict_logits` runs it in batches."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        opts = ort.SessionOptions()
        # default to torch's thread count so eager and ORT timings are comparable
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        self.path = Path(path)
        self.session = ort.InferenceSession(
            str(path), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name

    def predict_logits(self, x: np.ndarray | torch.Tensor, batch_size: int = 256) -> np.ndarray:
        """N x C x H x W float32 in [0, 1] -> N x num_classes logits (float32 numpy)."""
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().float().numpy()
        x = np.ascontiguousarray(x, dtype=np.float32)
        outs = [
            self.session.run(None, {self.input_name: x[i : i + batch_size]})[0]
            for i in range(0, len(x), batch_size)
        ]
        return np.concatenate(outs, axis=0)

    def __call__(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        return self.predict_logits(x)


class OrtModule(nn.Module):
    """An ONNX file behind the nn.Module call interface (float N x C x H x W -> logits), so
    code written for torch classifiers (`evaluate.model_logits`, the pyfunc) runs it as is.
    ORT runs on the CPU; outputs come back on the input's device."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        super().__init__()
        self.ort = OrtClassifier(path, threads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.ort.predict_logits(x.detach().cpu())
        return torch.from_numpy(logits).to(x.device)
