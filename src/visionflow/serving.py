"""MLflow pyfunc wrapper: image bytes or arrays in, labels and top-k probabilities out.

Preprocessing (decode, RGB/L conversion, resize, [0,1] scaling, normalisation) lives
inside the model, so `mlflow.pyfunc.load_model("models:/<name>@champion")` cannot be
fed wrongly. Weights load with `torch.load(weights_only=True)`: nothing is unpickled.
The model is logged "from code" (`pyfunc_model.py`), so no Python object is pickled.
"""

from __future__ import annotations

import io
import json
from typing import Any

import mlflow.pyfunc
import numpy as np

WEIGHTS = "weights"
PIP_REQUIREMENTS = [
    "torch==2.14.1", "torchvision==0.29.1", "pillow", "numpy", "pandas", "pydantic>=2",
    "mlflow>=3.17,<3.19",
]


def decode_image(data: bytes, size: int, channels: int) -> np.ndarray:
    """Image bytes -> uint8 C×size×size, normalised exactly like the training cache."""
    from visionflow.ingest import decode_resized

    return decode_resized(io.BytesIO(data), size, channels)


def to_batch(model_input: Any, size: int, channels: int) -> np.ndarray:
    """Accept a DataFrame with an `image` column of bytes, or a uint8/float array."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        col = model_input["image"] if "image" in model_input else model_input.iloc[:, 0]
        return np.stack([decode_image(bytes(b), size, channels) for b in col])
    arr = np.asarray(model_input)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.shape[-1] in (1, 3) and arr.shape[1] not in (1, 3):  # NHWC -> NCHW
        arr = arr.transpose(0, 3, 1, 2)
    if arr.dtype != np.uint8:
        arr = np.clip(arr * 255 if arr.max() <= 1.0 else arr, 0, 255).astype(np.uint8)
    return arr


class ImageClassifierModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from visionflow.classifier import load_classifier

        self.model, self.arch = load_classifier(context.artifacts[WEIGHTS])
        self.topk = min(5, self.arch.num_classes)

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        import pandas as pd
        import torch

        from visionflow.train import predict_logits

        batch = to_batch(model_input, self.arch.image_size, self.arch.in_channels)
        logits = predict_logits(self.model, torch.from_numpy(batch))
        probs = logits.softmax(1)
        top_p, top_i = probs.topk(self.topk, dim=1)
        classes = self.arch.classes
        return pd.DataFrame({
            "label": [classes[i[0]] for i in top_i.tolist()],
            "score": top_p[:, 0].tolist(),
            "topk": [json.dumps({classes[i]: round(p, 6) for i, p in zip(ii, pp, strict=True)})
                     for ii, pp in zip(top_i.tolist(), top_p.tolist(), strict=True)],
        })
