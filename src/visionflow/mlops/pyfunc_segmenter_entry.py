"""Entry file for MLflow "models from code": a segmentation model, nothing pickled."""

from mlflow.models import set_model

from visionflow.mlops.pyfunc_segmenter import ImageSegmenterModel

set_model(ImageSegmenterModel())
