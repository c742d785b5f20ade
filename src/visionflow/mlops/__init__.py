"""MLflow: tracking, the registry, the promotion gate, the served pyfunc, model cards."""
