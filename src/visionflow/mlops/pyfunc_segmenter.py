"""MLflow pyfunc for segmentation models (#19): images of any size in, masks out.

Input: like the classifiers' (`visionflow.mlops.pyfunc_classifier`): a DataFrame (or dict) with an
`image` column of encoded bytes (base64 in JSON over HTTP) or arrays (H x W, H x W x C or
C x H x W; uint8 or float 0..1). Each image runs at its own size (the models take any
H x W), so the mask has the input's size. Output, one row per image: `mask`, the index PNG
(VOC palette, one class index per pixel) base64-encoded; `height`, `width`; `classes`, a
JSON list of the class names present. `masks(images)` gives the H x W uint8 arrays
directly (`vflow predict`).

Weights load with `torch.load(weights_only=True)`; the model is logged "from code"
(`pyfunc_segmenter_entry.py`), nothing pickled. Bad input raises `BadInput` (HTTP 400,
one line naming the image).
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from torch import nn

from visionflow.core.errors import DataError, one_line
from visionflow.data.images import load_image
from visionflow.data.segmentation_masks import index_png_bytes
from visionflow.mlops.pyfunc_classifier import (
    WEIGHTS,
    BadInput,
    Limits,
    from_base64,
    image_column,
    limits_from,
)
from visionflow.model.segmentation import TASK, SegArch, load_segmenter

OUTPUT_COLUMNS = ("mask", "height", "width", "classes")


def image_to_hwc(value: Any, channels: int, limits: Limits) -> np.ndarray:
    """One image (bytes, base64 text or an array) -> uint8 H x W x C at its own size."""
    if isinstance(value, str):
        value = from_base64(value)
    if isinstance(value, bytes | bytearray | memoryview):
        if limits.max_bytes is not None and len(value) > limits.max_bytes:
            raise ValueError(f"{len(value)} bytes, more than the {limits.max_bytes} allowed "
                             "(validate.max_bytes when the model was registered)")
        arr = np.asarray(load_image(bytes(value), channels, max_pixels=limits.max_pixels),
                         dtype=np.uint8)
        return arr[..., None] if arr.ndim == 2 else arr
    return _array_to_hwc(np.asarray(value), channels, limits)


def _array_to_hwc(arr: np.ndarray, channels: int, limits: Limits) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = arr.transpose(1, 2, 0)  # CHW -> HWC
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4) or 0 in arr.shape:
        raise ValueError(f"image array must be HxW, HxWxC or CxHxW, got shape {arr.shape}")
    if arr.shape[0] * arr.shape[1] > limits.max_pixels:
        raise ValueError(f"{arr.shape[1]}x{arr.shape[0]} pixels, more than the "
                         f"{limits.max_pixels} allowed")
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float64)
        if np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.rint(np.nan_to_num(arr)), 0, 255).astype(np.uint8)
    if arr.shape[-1] == 4:  # alpha composited on black, as in ingest
        arr = np.rint(arr[..., :3] * (arr[..., 3:4] / 255.0)).astype(np.uint8)
    if channels == 3 and arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    elif channels == 1 and arr.shape[-1] == 3:  # ITU-R 601-2 luma, as PIL's "L"
        luma = arr @ np.array([0.299, 0.587, 0.114])
        arr = np.rint(luma).astype(np.uint8)[..., None]
    return arr


def images_of(model_input: Any) -> list[Any]:
    """The `image` column of a DataFrame / dict / Series, or a list of images."""
    model_input = image_column(model_input)
    if isinstance(model_input, np.ndarray) and model_input.ndim in (2, 3):
        return [model_input]  # one image array
    return list(model_input)


def mask_frame(masks: list[np.ndarray], classes: list[str]) -> pd.DataFrame:
    """H x W uint8 masks -> the served columns (`OUTPUT_COLUMNS`)."""
    def present(m: np.ndarray) -> str:
        return json.dumps([classes[i] if i < len(classes) else str(i)
                           for i in np.unique(m).tolist()])

    return pd.DataFrame({
        "mask": [base64.b64encode(index_png_bytes(m)).decode("ascii") for m in masks],
        "height": [int(m.shape[0]) for m in masks],
        "width": [int(m.shape[1]) for m in masks],
        "classes": [present(m) for m in masks],
    })


class ImageSegmenterModel(mlflow.pyfunc.PythonModel):
    """A saved segmenter (`save_segmenter`) behind the pyfunc interface."""

    task = TASK
    model: nn.Module
    arch: SegArch

    def load_context(self, context) -> None:
        self.configure(dict(getattr(context, "model_config", None) or {}))
        self.model, self.arch = load_segmenter(context.artifacts[WEIGHTS])

    def configure(self, config: dict[str, Any]) -> None:
        self.limits = limits_from(config)
        self.device: Any = "cpu"

    def to(self, device: Any) -> ImageSegmenterModel:
        self.model = self.model.to(device)
        self.device = device
        return self

    @torch.inference_mode()
    def masks(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """H x W x C uint8 images (any sizes) -> H x W uint8 class-index masks."""
        out = []
        for hwc in images:
            x = torch.from_numpy(np.ascontiguousarray(hwc.transpose(2, 0, 1)))
            logits = self.model(x[None].to(self.device).float().div_(255))
            out.append(logits.argmax(1)[0].to(torch.uint8).cpu().numpy())
        return out

    def decode(self, model_input: Any) -> list[np.ndarray]:
        """The request's images as H x W x C uint8; `BadInput` naming the one that is none."""
        try:
            values = images_of(model_input)
        except (TypeError, ValueError) as err:
            raise BadInput(one_line(err)) from None
        if not values:
            raise BadInput("no image in the request (the `image` column is empty)")
        images = []
        for i, value in enumerate(values):
            try:
                images.append(image_to_hwc(value, self.arch.in_channels, self.limits))
            except (DataError, ValueError, TypeError, binascii.Error) as err:
                raise BadInput(f"image {i}: {one_line(err)}") from None
        return images

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None):
        return mask_frame(self.masks(self.decode(model_input)), self.arch.classes)
