"""The project's MLflow store as a stage opens it: a new store's first use prints nothing of
MLflow's own (a stage prints its result lines; "Creating initial MLflow database tables..."
came before the first epoch of every new project)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

OPEN_STORE = ("import sys; from visionflow.core.layout import Layout; "
              "from visionflow.mlops import tracking; tracking.setup(Layout.at(sys.argv[1]))")


def test_a_new_store_opens_without_mlflows_info_lines(tmp_path: Path):
    out = subprocess.run([sys.executable, "-c", OPEN_STORE, str(tmp_path)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "mlruns" / "mlflow.db").is_file()
    assert "INFO mlflow" not in out.stdout + out.stderr, out.stderr
