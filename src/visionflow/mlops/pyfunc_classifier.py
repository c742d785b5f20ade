"""MLflow pyfunc wrapper: image bytes or arrays in, labels and top-k probabilities out.

Preprocessing (decode, RGB/L conversion, resize, [0,1] scaling, normalisation) lives
inside the model, so `mlflow.pyfunc.load_model("models:/<name>@champion")` cannot be
fed wrongly. Weights load with `torch.load(weights_only=True)`: nothing is unpickled.
The model is logged "from code" (`pyfunc_classifier_entry.py`), so no Python object is pickled.

Input: a DataFrame (or dict) with an `image` column. Each value is encoded image bytes
(PNG, JPEG, ...; base64 in JSON over HTTP, which MLflow decodes from the signature) or an
array: H×W, H×W×C or C×H×W, uint8 0..255 or float 0..1, any size (resized like the
training images). Output: one row per image with `label`, `score` (its probability) and
`topk`, a JSON list of {"label", "probability"}, best first. `params={"topk": k}` changes k.

Bad input (not an image, empty, an array that is no image, too many bytes or pixels, no
rows, topk < 1) raises `BadInput`: `mlflow models serve` answers HTTP 400 with one line
naming the image and the reason, and goes on serving.
"""

from __future__ import annotations

import binascii
import json
from dataclasses import dataclass
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from visionflow.core.errors import DataError, one_line
from visionflow.data.images import DEFAULT_MAX_PIXELS, decode_eval, eval_crop
from visionflow.model.classifier import load_classifier
from visionflow.model.inference import model_logits

WEIGHTS = "weights"
PIP_REQUIREMENTS = [
    "torch==2.14.1", "torchvision==0.29.1", "pillow", "numpy", "pandas", "pydantic>=2",
    "mlflow>=3.17,<3.19",
]


class BadInput(MlflowException):
    """A request the model cannot answer: HTTP 400 from `mlflow models serve`, with this one
    line as the JSON `message`. (The server rewrites a predict error's message to "Failed to
    predict data '<the whole input>'. \\nError: ..."; this one keeps its own line.)"""

    def __init__(self, reason: str) -> None:
        self._reason = one_line(reason)
        super().__init__(self._reason, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._reason

    @message.setter
    def message(self, _value: str) -> None:
        pass  # (the server's rewrite)


def decode_image(data: bytes, size: int, channels: int, resize: int | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Image bytes -> uint8 C×size×size, normalised exactly like the training cache (or, for
    a shard-trained model, resized to `resize` and centre-cropped as in its evaluation)."""
    return decode_eval(bytes(data), size, channels, resize, max_pixels=max_pixels)


def array_to_chw(value: Any, size: int, channels: int,
                 resize: int | None = None) -> np.ndarray:
    """One image array (H×W, H×W×C or C×H×W; uint8 or float in 0..1) -> uint8 C×size×size."""
    from PIL import Image

    arr = np.asarray(value)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = arr.transpose(1, 2, 0)  # CHW -> HWC
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ValueError(f"image array must be HxW, HxWxC or CxHxW, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float64)
        if arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.rint(np.nan_to_num(arr)), 0, 255).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[-1] == 4:  # alpha composited on black, as in ingest
        alpha = arr[..., 3:4].astype(np.float64) / 255.0
        arr = np.rint(arr[..., :3] * alpha).astype(np.uint8)
    want = "L" if channels == 1 else "RGB"
    if arr.ndim == 3 and arr.shape[:2] == (size, size) and channels == 3:
        out = arr
    elif arr.ndim == 2 and arr.shape == (size, size) and channels == 1:
        out = arr[..., None]
    elif resize is not None:  # full size: the model's evaluation transform
        img = Image.fromarray(arr)
        out = np.asarray(img.convert(want) if img.mode != want else img, dtype=np.uint8)
        out = out[..., None] if out.ndim == 2 else out
        return eval_crop(out.transpose(2, 0, 1), size, resize)
    else:
        img = Image.fromarray(arr)
        img = img.convert(want) if img.mode != want else img
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BILINEAR)
        out = np.asarray(img, dtype=np.uint8)
        out = out[..., None] if out.ndim == 2 else out
    return np.ascontiguousarray(out.transpose(2, 0, 1))


@dataclass(frozen=True)
class Limits:
    """What one image of a request may be: encoded bytes, decoded pixels."""

    max_bytes: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS


def from_base64(text: str) -> bytes:
    """An image sent as text (a caller that skipped the signature, a CSV body): base64."""
    import base64

    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as e:
        raise ValueError(f"text that is not base64-encoded image bytes ({e})") from None


def _one(value: Any, size: int, channels: int, limits: Limits,
         resize: int | None = None) -> np.ndarray:
    if isinstance(value, str):
        value = from_base64(value)
    if isinstance(value, bytes | bytearray | memoryview):
        if limits.max_bytes is not None and len(value) > limits.max_bytes:
            raise ValueError(f"{len(value)} bytes, more than the {limits.max_bytes} allowed "
                             "(validate.max_bytes when the model was registered)")
        return decode_image(bytes(value), size, channels, resize, limits.max_pixels)
    return array_to_chw(value, size, channels, resize)


def to_batch(model_input: Any, size: int, channels: int, limits: Limits | None = None,
             resize: int | None = None) -> np.ndarray:
    """DataFrame/dict with an `image` column (bytes or arrays), a list of those, or an
    N×C×H×W / N×H×W×C array -> uint8 N×C×size×size; `BadInput` naming the image that is
    none."""
    try:
        return _to_batch(model_input, size, channels, limits or Limits(), resize)
    except BadInput:
        raise
    except (DataError, ValueError, TypeError, binascii.Error) as err:
        raise BadInput(one_line(err)) from None


def image_column(model_input: Any) -> Any:
    """The `image` column of a DataFrame / dict / Series as a list (else the input as is)."""
    if isinstance(model_input, dict):
        model_input = model_input.get("image", next(iter(model_input.values()), []))
    if isinstance(model_input, pd.DataFrame):
        model_input = model_input["image"] if "image" in model_input else model_input.iloc[:, 0]
    if isinstance(model_input, pd.Series):
        model_input = model_input.tolist()
    return model_input


def _to_batch(model_input: Any, size: int, channels: int, limits: Limits,
              resize: int | None) -> np.ndarray:
    model_input = image_column(model_input)
    if isinstance(model_input, list | tuple):
        if not model_input:
            return np.zeros((0, channels, size, size), dtype=np.uint8)
        return np.stack([_numbered(i, v, size, channels, limits, resize)
                         for i, v in enumerate(model_input)])
    arr = np.asarray(model_input)
    if arr.ndim in (2, 3):  # a single image
        return array_to_chw(arr, size, channels, resize)[None]
    if arr.ndim != 4:
        raise ValueError(f"expected images, got an array of shape {arr.shape}")
    return np.stack([array_to_chw(a, size, channels, resize) for a in arr])


def _numbered(i: int, value: Any, size: int, channels: int, limits: Limits,
              resize: int | None) -> np.ndarray:
    try:
        return _one(value, size, channels, limits, resize)
    except (DataError, ValueError, TypeError, binascii.Error) as err:
        raise BadInput(f"image {i}: {one_line(err)}") from None


def topk_frame(probs: Any, classes: list[str], k: int):
    """probs (N×C torch tensor) -> DataFrame label, score, topk (JSON list)."""
    k = max(1, min(int(k), len(classes)))
    top_p, top_i = probs.topk(k, dim=1)
    rows_i, rows_p = top_i.tolist(), top_p.tolist()
    return pd.DataFrame({
        "label": [classes[ii[0]] for ii in rows_i],
        "score": [pp[0] for pp in rows_p],
        "topk": [json.dumps([{"label": classes[i], "probability": round(p, 6)}
                             for i, p in zip(ii, pp, strict=True)])
                 for ii, pp in zip(rows_i, rows_p, strict=True)],
    })


class ImageClassifierModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:

        config = dict(getattr(context, "model_config", None) or {})
        self.model, self.arch = load_classifier(context.artifacts[WEIGHTS])
        self.topk = min(int(config.get("topk", 5)), self.arch.num_classes)
        self.tta = bool(config.get("tta", False))
        self.limits = limits_from(config)
        self.device = "cpu"

    def to(self, device: Any) -> ImageClassifierModel:
        """Move the network (e.g. to CUDA for batch prediction)."""
        self.model = self.model.to(device)
        self.device = device
        return self

    def probabilities(self, batch_uint8: np.ndarray, batch_size: int = 256):
        """uint8 N×C×H×W at the model's size -> N×C softmax (CPU tensor)."""
        import torch


        x = torch.from_numpy(np.ascontiguousarray(batch_uint8))
        return model_logits(self.model, x, batch_size, self.device, self.tta,
                            self.arch.temperature).softmax(1)

    # pd.DataFrame: MLflow infers nothing from this hint (the signature is given explicitly)
    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None):
        k = (params or {}).get("topk")
        k = self.topk if k is None else k
        if not isinstance(k, int | np.integer) or k < 1:
            raise BadInput(f"params.topk must be a whole number >= 1, got {k!r}")
        batch = to_batch(model_input, self.arch.image_size, self.arch.in_channels,
                         getattr(self, "limits", None), getattr(self.arch, "resize_size", None))
        if not len(batch):
            raise BadInput("no image in the request (the `image` column is empty)")
        return topk_frame(self.probabilities(batch), self.arch.classes, int(k))


def limits_from(config: dict[str, Any]) -> Limits:
    """The per-image limits a model was registered with (none recorded: decoding's own)."""
    return Limits(config.get("max_image_bytes"),
                  int(config.get("max_image_pixels") or DEFAULT_MAX_PIXELS))
