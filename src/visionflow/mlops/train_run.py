"""The pipeline's MLflow run, as train opens it for either task: rank 0 alone opens it, with
the pipeline's tags, every param, the datasets it trains on, the validation report, the
augmentation policy and the data's `.dvc` file, and MLflow's system metrics sampled while it
trains. Evaluate, compress and register later log into this same run (`tracking.stage_run`)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import mlflow

from visionflow.core.config import Params
from visionflow.core.files import read_json
from visionflow.core.layout import Layout
from visionflow.data.packed import source_data_hash
from visionflow.mlops import tracking
from visionflow.mlops.datasets import log_datasets
from visionflow.model.engine import Dist

SYSTEM_METRICS_INTERVAL_S = 10.0
CURVES = "curves/"  # per-epoch metrics: first among the run's charts


@contextmanager
def train_run(params: Params, layout: Layout, device: str, dist: Dist) -> Iterator[Any]:
    """Yields the active MLflow run on rank 0, None on the other ranks (they log nothing).
    The run is named after the model and the start time."""
    if not dist.main:
        yield None
        return
    tags = tracking.pipeline_run_tags(params, source_data_hash(layout), device, dist.world)
    name = f"{tags['model']}-{time.strftime('%Y%m%d-%H%M%S')}"
    with tracking.new_run(layout, name, tags) as run, system_metrics(run.info.run_id):
        mlflow.log_params(tracking.flat_params(params.dump()))
        log_datasets(params, layout)  # the data it trains on: "Datasets used"
        tracking.log_validation(layout)  # validation report, data summary, quarantine, Data Docs
        tracking.log_dir_or_file(layout.policy, "data")
        rel = (read_json(layout.validation, {}) or {}).get("dvc_file")  # the data version
        tracking.log_dir_or_file(layout.root / rel if rel else layout.dvc_file("data"),
                                 "dvc")  # (git may not have it)
        yield run


@contextmanager
def system_metrics(run_id: str) -> Iterator[Any]:
    """MLflow's system metrics (`system/cpu_utilization_percentage`, memory, disk, network;
    GPU utilisation and memory through NVML when a GPU is there) every 10 s during training,
    plus one last sample at the end, so that a run shorter than the interval has one too."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S)
    monitor.start()
    try:
        yield monitor
    finally:
        monitor.finish()  # joins the sampling thread
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()


def log_epoch(row: dict[str, Any]) -> None:
    """One history row as `curves/*` metrics at step `row["epoch"]` (None values left out)."""
    mlflow.log_metrics({CURVES + k: v for k, v in row.items() if v is not None and k != "epoch"},
                       step=row["epoch"])
