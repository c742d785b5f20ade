"""MLflow wiring: one run per pipeline execution, in the project's sqlite store under
`mlruns/`, or on the tracking server `MLFLOW_TRACKING_URI` names (the team stack).

train opens the run and records its id in `outputs/train/run.json`; evaluate, compress
and register log into the same run, so a pipeline is one row in `mlflow ui`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from visionflow.core.config import STAGE_NAMES
from visionflow.core.env import quiet_env
from visionflow.core.errors import VisionflowError
from visionflow.core.files import write_json
from visionflow.core.layout import Layout

EXPERIMENT = "visionflow"
_PROXY_CALL = re.compile(r"API request to (https?://[^/\s]+)(/api/2\.0/mlflow-artifacts)\S* "
                         r"failed with exception (.*)", re.DOTALL)


class ArtifactStoreUnavailable(VisionflowError):
    """The tracking server answered, its artifact store did not (one line)."""

    exit_code = 1


def artifact_store_error(err: BaseException) -> str | None:
    """One line naming the endpoints when `err` is the tracking server's artifact proxy
    failing (its object store down), else None."""
    m = _PROXY_CALL.search(str(err))
    if not m:
        return None
    cause = m.group(3).strip().splitlines()[0]
    cause = (re.search(r"Caused by (\w+\(.*?\))\)?$", cause) or re.search(r"(.*)", cause)).group(1)
    store = os.environ.get("MLFLOW_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
    behind = f" (object store {store})" if store else ""
    return (f"artifact store unavailable: {m.group(1)}{m.group(2)}{behind} failed: "
            f"{cause[:200]}; nothing was registered")


@contextmanager
def artifact_store_guard():
    """Re-raise the artifact store's outage as `ArtifactStoreUnavailable` (one line)."""
    try:
        yield
    except Exception as err:
        if why := artifact_store_error(err):
            raise ArtifactStoreUnavailable(why) from None
        raise


def tracking_uri(layout: Layout) -> str:
    default = f"sqlite:///{layout.mlflow_db}"
    return os.environ.get("MLFLOW_TRACKING_URI") or default


def is_server(uri: str) -> bool:
    """A tracking server (`http(s)://`, Databricks), which stores artifacts itself; any
    other store (sqlite, a folder, a database URL) has its artifacts written by the client."""
    return uri.split(":", 1)[0] in ("http", "https", "databricks")


PROXY_ONLY = {"MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false",
              "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD": "false"}


def proxy_artifacts() -> None:
    """Artifacts go through the tracking server, both ways.

    MLflow 3's server advertises presigned downloads when its artifact store is S3, and
    clients then fetch from the object store directly, at the address the *server* uses
    for it (loopback in `vflow stack`, a private endpoint in most clouds). A client of a
    team server needs only its HTTP URI: these defaults keep it that way (set them to true
    where every host can reach the store, to take load off the server)."""
    for key, value in PROXY_ONLY.items():
        os.environ.setdefault(key, value)


def ui_command(layout: Layout) -> str:
    uri = tracking_uri(layout)
    if is_server(uri):
        return f"open {uri} (the tracking server's UI)"
    return f"mlflow ui --backend-store-uri {uri}"


def use_uri(uri: str) -> None:
    """`mlflow.set_tracking_uri` without its side effect of exporting MLFLOW_TRACKING_URI.

    MLflow copies the URI into os.environ "so that subprocesses inherit it"; then
    `tracking_uri(other_layout)` would return the first project's store, and every child
    (`dvc repro`, `mlflow models serve`, a second project) would write to it. The variable
    keeps the value the user gave it (or stays unset).
    """
    import mlflow

    if is_server(uri):
        proxy_artifacts()
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


# MLflow's INFO lines a stage would print: the system metrics monitor's start and stop (four
# lines a training run), the pyfunc input example check (each logged model) and a new store's
# "Creating initial MLflow database tables..." (the first run). Its other INFO lines stay,
# "View run ... at" with a tracking server among them.
CHATTY_LOGGERS = ("mlflow.system_metrics.system_metrics_monitor", "mlflow.pyfunc",
                  "mlflow.store.db.utils")


def setup(layout: Layout) -> str:
    """Point MLflow at the project store and make sure the experiment exists.

    A tracking server decides itself where artifacts go (with `--serve-artifacts`: its
    object store, reached through it), so no path of this machine is pinned into a shared
    experiment; any other store keeps them in the project (`mlruns/artifacts`)."""
    quiet_env()
    import logging

    import mlflow

    for name in CHATTY_LOGGERS:  # their INFO lines say nothing a stage's user acts on
        logging.getLogger(name).setLevel(logging.WARNING)
    uri = tracking_uri(layout)
    use_uri(uri)
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        artifacts = None if is_server(uri) else layout.mlflow_artifacts.as_uri()
        exp_id = _create_experiment(mlflow, artifacts)
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def _create_experiment(mlflow: Any, artifacts: str | None) -> str:
    """Create the experiment; another host creating it at the same moment is fine."""
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.create_experiment(EXPERIMENT, artifact_location=artifacts)
    except MlflowException:
        exp = mlflow.get_experiment_by_name(EXPERIMENT)
        if exp is None:
            raise
        return exp.experiment_id


@contextmanager
def new_run(layout: Layout, name: str, tags: dict[str, str] | None = None) -> Iterator[Any]:
    """Start a pipeline run and remember its id for the later stages."""
    import mlflow

    setup(layout)
    with mlflow.start_run(run_name=name, tags=tags) as run:
        write_json(layout.run_info, {"run_id": run.info.run_id,
                                     "experiment_id": run.info.experiment_id})
        yield run


@contextmanager
def stage_run(layout: Layout) -> Iterator[Any]:
    """Re-open the pipeline run recorded by train (a new run if it is gone)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    setup(layout)
    run_id = None
    if layout.run_info.is_file():
        run_id = json.loads(layout.run_info.read_text()).get("run_id")
    if run_id:
        try:
            mlflow.get_run(run_id)
        except MlflowException:
            run_id = None
    with mlflow.start_run(run_id=run_id) as run:
        yield run


def log_dir_or_file(path: Path, artifact_path: str | None = None) -> None:
    import mlflow

    if path.is_dir():
        mlflow.log_artifacts(str(path), artifact_path)
    elif path.is_file():
        mlflow.log_artifact(str(path), artifact_path)


def log_validation(layout: Layout) -> None:
    """validation.json, data_summary.json, quarantine.csv and the Data Docs into the active
    run, under `data/` (Data Docs under `data/data_docs/`)."""
    for path, artifact_path in layout.validation_artifacts():
        log_dir_or_file(path, artifact_path)


NOTE = "mlflow.note.content"  # the run's description in the UI
STAGES = " > ".join(STAGE_NAMES)


def pipeline_run_tags(params: Any, data_hash: str, device: str, world: int) -> dict[str, str]:
    """What the pipeline run is, as tags and a description (one run records all six
    stages; register adds the outcome). The model is the task's: `train.model` for
    classification, `segmentation.model` for segmentation."""
    fit = params.segmentation if params.task == "segmentation" else params.train
    tags = {"kind": "pipeline", "stages": STAGES, "task": params.task, "model": fit.model,
            "lineage.data_hash": data_hash, "device": device, "world_size": str(world),
            NOTE: (f"visionflow pipeline run: {STAGES}. Trains `{fit.model}` "
                   f"({fit.epochs} epochs) on `{params.data.source}` (data "
                   f"{data_hash[:12] or '?'}), evaluates it on the test split, compresses "
                   "it and registers it behind the champion gate. Charts: `curves/*` per "
                   "epoch, `test/*` test split, `variants/*` compressed variants.")}
    return {k: v for k, v in tags.items() if v}


def add_outcome(text: str) -> None:
    """Append the registration's outcome to the active run's description."""
    import mlflow

    run = mlflow.active_run()
    note = mlflow.get_run(run.info.run_id).data.tags.get(NOTE, "") if run else ""
    mlflow.set_tag(NOTE, (note + "\n\n" if note else "") + text)


def flat_params(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_params(v, f"{key}."))
        else:
            out[key] = v
    return out
