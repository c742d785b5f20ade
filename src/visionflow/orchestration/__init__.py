"""Driving the stages: dvc.yaml specs, what is stale, the data trigger, retries, reports."""
