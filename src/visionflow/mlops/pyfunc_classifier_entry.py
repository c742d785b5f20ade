"""Entry file for MLflow "models from code": logs the pyfunc without pickling anything."""

from mlflow.models import set_model

from visionflow.mlops.pyfunc_classifier import ImageClassifierModel

set_model(ImageClassifierModel())
