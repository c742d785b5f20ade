"""Post-training static int8 quantization of an ONNX classifier with ONNX Runtime (QDQ format).

Weights are int8 per output channel; activations are int8 per tensor with ranges calibrated
(MinMax) on a subset of training images. ORT fuses QDQ pairs into int8 kernels at load time.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from visionflow.compression.measure import model_size_bytes
from visionflow.core.files import atomic_path


class ImageCalibrationReader(CalibrationDataReader):
    """Feeds float32 [0, 1] images to the calibrator in batches."""

    def __init__(self, images: torch.Tensor | np.ndarray, input_name: str, batch_size: int = 32):
        if isinstance(images, torch.Tensor):
            images = images.detach().cpu().float().numpy()
        self.images = np.ascontiguousarray(images, dtype=np.float32)
        self.input_name = input_name
        self.batch_size = batch_size
        self._pos = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pos >= len(self.images):
            return None
        batch = self.images[self._pos : self._pos + self.batch_size]
        self._pos += self.batch_size
        return {self.input_name: batch}

    def rewind(self) -> None:
        self._pos = 0


def _input_name(onnx_path: Path) -> str:
    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    return next(i.name for i in model.graph.input if i.name not in inits)


def quantize_int8_onnx(
    fp32_onnx_path: str | Path,
    calib_images: torch.Tensor,
    out_path: str | Path,
    per_channel: bool = True,
    activation_type: QuantType = QuantType.QInt8,
    calibrate_method: CalibrationMethod = CalibrationMethod.MinMax,
    keep_first_conv: bool = False,
) -> Path:
    """Quantize `fp32_onnx_path` to int8 QDQ at `out_path` (written atomically); returns it.

    `calib_images`: N x C x H x W float in [0, 1] (or uint8), e.g. 64-512 training images.
    The model is first pre-processed (ORT graph optimisation + shape inference), as ORT
    recommends. With `keep_first_conv` the first Conv node (the stem, which sees the raw
    pixels: few MACs, and the layer int8 hurts most, e.g. a patch-whitening stem) stays fp32.
    """
    if calib_images.dtype == torch.uint8:
        calib_images = calib_images.float().div(255)
    fp32_onnx_path, out_path = Path(fp32_onnx_path), Path(out_path)
    if len(calib_images) == 0:
        raise ValueError("quantize_int8_onnx needs at least one calibration image")
    reader = ImageCalibrationReader(calib_images, _input_name(fp32_onnx_path))
    with tempfile.TemporaryDirectory(prefix="vf-quant-") as tmp:
        pre = Path(tmp) / "preprocessed.onnx"
        _pre_process(fp32_onnx_path, pre)
        with atomic_path(out_path) as tmp_out, _quiet_axis_warnings():
            quantize_static(
                str(pre),
                str(tmp_out),
                calibration_data_reader=reader,
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                activation_type=activation_type,
                weight_type=QuantType.QInt8,
                calibrate_method=calibrate_method,
                nodes_to_exclude=_first_conv(pre) if keep_first_conv else [],
            )
    return out_path


@contextmanager
def _quiet_axis_warnings() -> Iterator[None]:
    """ORT logs one root-logger warning per 1-D weight (a norm scale) that per-channel
    quantization cannot split along axis 1; it quantizes those per tensor, as intended."""
    drop = logging.Filter()
    drop.filter = lambda r: "is out-of-range for weight" not in r.getMessage()  # type: ignore
    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def _first_conv(onnx_path: Path) -> list[str]:
    model = onnx.load(str(onnx_path), load_external_data=False)
    return [n.name for n in model.graph.node if n.op_type == "Conv"][:1]


def _pre_process(src: Path, dst: Path) -> None:
    """ORT's recommended pre-processing; symbolic shape inference first, plain ONNX shape
    inference when it fails (it cannot follow e.g. ReduceMax -> Reshape of a global max-pool
    exported by dynamo)."""
    try:
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)
    except Exception:  # onnxruntime.tools.symbolic_shape_infer raises plain TypeErrors
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)


def size_ratio(fp32_path: str | Path, int8_path: str | Path) -> float:
    """int8 file size / fp32 file size."""
    return model_size_bytes(int8_path) / model_size_bytes(fp32_path)
