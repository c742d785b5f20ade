"""visionflow: workflow-orchestrated MLOps for image classification."""

__version__ = "0.1.0"
