"""MLflow pyfunc for a compressed variant: an ONNX file run by ONNX Runtime.

Same interface as the main model (`visionflow.mlops.pyfunc_classifier.ImageClassifierModel`:
image bytes or arrays in an `image` column -> `label`, `score`, `topk`; `probabilities`, `to`,
`arch` for `vflow predict`), same preprocessing. Only the network differs: the variant's ONNX file
(int8 QDQ, or the fp32 export of a pruned / factorised / distilled network), so nothing is
unpickled and no structure-aware rebuild is needed. The architecture dict (input size,
channels, classes) comes from the logged `model_config`.
"""

from __future__ import annotations

from typing import Any

from visionflow.compression.onnx_export import OrtModule
from visionflow.mlops.pyfunc_classifier import ImageClassifierModel, limits_from
from visionflow.model.classifier import Arch

ONNX_ARTIFACT = "onnx"


class CompactClassifierModel(ImageClassifierModel):
    def load_context(self, context) -> None:

        config = dict(getattr(context, "model_config", None) or {})
        self.arch = Arch(**config["arch"])
        self.model = OrtModule(context.artifacts[ONNX_ARTIFACT])
        self.topk = min(int(config.get("topk", 5)), self.arch.num_classes)
        self.tta = bool(config.get("tta", False))
        self.limits = limits_from(config)
        self.device = "cpu"

    def to(self, device: Any) -> CompactClassifierModel:
        """A no-op: the ONNX model runs on ONNX Runtime's CPU provider wherever asked to."""
        return self
