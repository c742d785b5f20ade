"""Entry file for MLflow "models from code": the compact (compressed) model, nothing pickled."""

from mlflow.models import set_model

from visionflow.mlops.pyfunc_compact import CompactClassifierModel

set_model(CompactClassifierModel())
