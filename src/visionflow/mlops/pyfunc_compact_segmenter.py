"""MLflow pyfunc for a compressed segmentation variant: an ONNX file (int8 QDQ or the fp32
export of a pruned network, dynamic height and width) run by ONNX Runtime. Same interface
and output as `visionflow.mlops.pyfunc_segmenter.ImageSegmenterModel`; the architecture
(channels, classes) comes from the logged `model_config`."""

from __future__ import annotations

from typing import Any

from visionflow.compression.onnx_export import OrtModule
from visionflow.mlops.pyfunc_compact import ONNX_ARTIFACT
from visionflow.mlops.pyfunc_segmenter import ImageSegmenterModel
from visionflow.model.segmentation import SegArch


class CompactSegmenterModel(ImageSegmenterModel):
    def load_context(self, context) -> None:
        config = dict(getattr(context, "model_config", None) or {})
        self.configure(config)
        self.arch = SegArch(**config["arch"])
        self.model = OrtModule(context.artifacts[ONNX_ARTIFACT])

    def to(self, device: Any) -> CompactSegmenterModel:
        """A no-op: ONNX Runtime's CPU provider runs it wherever asked to."""
        return self
