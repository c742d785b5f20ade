"""Entry file for MLflow "models from code": a compressed segmentation model (ONNX)."""

from mlflow.models import set_model

from visionflow.mlops.pyfunc_compact_segmenter import CompactSegmenterModel

set_model(CompactSegmenterModel())
