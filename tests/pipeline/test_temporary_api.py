"""Without a Prefect server, a flow runs on Prefect's temporary API. Prefect waits 20 s for
it by default; a fresh database's migrations take about 30 s on 2 quiet cores, so `make run`
in a fresh clone failed. The entry points give it as long as `vflow server start` gives a
server, keep a timeout the user set, and a start that still fails is one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers import BIN, make_project

from visionflow.orchestration.servers import EPHEMERAL_TIMEOUT, PREFECT

PROBE = """
import sys
from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as wait
from visionflow.core.layout import Layout
from visionflow.orchestration.servers import prefect_api
with prefect_api(Layout.at(sys.argv[1])) as url:
    print(url, wait.value())
print(wait.value())
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in (EPHEMERAL_TIMEOUT, "PREFECT_API_URL")}
    return {**env, **extra}


def _probe(root: Path, env: dict[str, str]) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE, str(root)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.split()


def test_the_temporary_api_waits_as_long_as_a_server_start(tmp_path: Path):
    waited = str(int(PREFECT.start_timeout_s))
    assert int(waited) > 20  # Prefect's own default
    # inside: the project's wait; after: Prefect's own again
    assert _probe(tmp_path, _env()) == ["None", waited, "20"]
    assert _probe(tmp_path, _env(**{EPHEMERAL_TIMEOUT: "45"})) == ["None", "45", "45"]


def test_a_temporary_api_that_does_not_start_is_one_line(tmp_path: Path, digits_dir: Path):
    root = make_project(tmp_path / "proj", digits_dir)
    out = subprocess.run([str(BIN / "vflow"), "run", "--root", str(root)],
                         env=_env(**{EPHEMERAL_TIMEOUT: "1"}), capture_output=True, text=True,
                         timeout=300)
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert out.returncode == 1, out.stderr[-3000:]
    assert errors == [f"error: Prefect's temporary API did not start within 1 s "
                      f"({EPHEMERAL_TIMEOUT}): start a server with `vflow server start`, "
                      "or allow it longer"], out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert not (root / "outputs").exists()  # no stage ran


def test_server_start_help_states_the_services_own_wait():
    from typer.testing import CliRunner

    from visionflow.cli.main import app
    from visionflow.orchestration.servers import MLFLOW

    for group in ("server", "ui"):
        out = CliRunner().invoke(app, [group, "start", "--help"], env={"COLUMNS": "200"}).output
        assert (f"(default: {PREFECT.start_timeout_s:.0f} Prefect, "
                f"{MLFLOW.start_timeout_s:.0f} MLflow)") in out, out
