"""An empty MLflow sqlite store for a test project's `mlruns/` (no tests here).

MLflow builds a fresh sqlite store by running its whole chain of schema migrations, seconds
each time; the test projects start from a copy of one store built once per process, the
same database in milliseconds. Its `Default` experiment points into the project, as MLflow
would have made it from the project root. The product creating a store itself stays
covered: the gate and registry tests start from an empty folder.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
from pathlib import Path

_BUILT: dict[str, Path] = {}


def _template() -> Path | None:
    """A migrated, empty store (built in this process's temp cache on first use); None
    without MLflow (the GPU machine's torch-only tests)."""
    db = _BUILT.get("db")
    if db is None or not db.is_file():
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            return None

        cache = Path(os.environ.get("XDG_CACHE_HOME") or tempfile.gettempdir())
        cache.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="vflow-mlflow-store-", dir=cache))
        db = folder / "mlflow.db"
        MlflowClient(f"sqlite:///{db}").search_experiments()  # runs the migrations
        _BUILT["db"] = db
    return db


def seed_store(mlruns: Path) -> Path:
    """`mlruns/mlflow.db`: a copy of the migrated store (`mlruns` is created if missing)."""
    mlruns.mkdir(parents=True, exist_ok=True)
    db = mlruns / "mlflow.db"
    template = _template()
    if template is None:
        return db
    shutil.copyfile(template, db)
    with sqlite3.connect(db) as con:  # MLflow's default: <cwd>/mlruns/0
        con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                    (str(mlruns.resolve() / "0"),))
    con.close()
    return db
