"""Shared fixtures: every test runs in temp dirs with its own HOME, Prefect home, DVC site
cache and MLflow store, no network, telemetry off."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

# `import dvc` binds DVC's log handlers to the sys.stdout/stderr of that moment: here, the
# session's capture streams. Imported first inside a test using capsys, they would hold that
# test's stream, closed afterwards, and a later in-process flow's DVC warning would raise.
# The GPU machine has no DVC (nor MLflow, Prefect, pydantic): `pytest -m gpu` on the
# torch-only test files must still collect there (bench/gpu_bench.py step 5).
with contextlib.suppress(ImportError):
    import dvc  # noqa: F401
pytest_plugins = ["stack_fixtures"]  # the team stack, once per session (`-m stack` tests)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SHARED_CIFAR = REPO.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"

_SANDBOX = Path(tempfile.mkdtemp(prefix="vflow-tests-"))
for _key, _value in {
    "HOME": str(_SANDBOX / "home"),
    "XDG_CONFIG_HOME": str(_SANDBOX / "home" / ".config"),
    "XDG_CACHE_HOME": str(_SANDBOX / "home" / ".cache"),
    "MPLCONFIGDIR": str(_SANDBOX / "mpl"),
    "PREFECT_HOME": str(_SANDBOX / "prefect"),
    "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(_SANDBOX / "prefect" / "results"),
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "DVC_SITE_CACHE_DIR": str(_SANDBOX / "dvc-site"),
    "DVC_NO_ANALYTICS": "1",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "GIT_AUTHOR_NAME": "vflow-test",
    "GIT_AUTHOR_EMAIL": "test@example.invalid",
    "GIT_COMMITTER_NAME": "vflow-test",
    "GIT_COMMITTER_EMAIL": "test@example.invalid",
    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
}.items():
    os.environ[_key] = _value
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("PREFECT_API_URL", None)
(_SANDBOX / "home").mkdir(parents=True, exist_ok=True)

# Small and fast: the whole pipeline on a digits subset in seconds.
TINY = {
    "data.image_size": 16,
    "train.model": "fast",
    "train.lr": 0.5,
    "train.epochs": 2,
    "train.batch_size": 64,
    "train.threads": 2,
    "train.deterministic": True,
    "compress.calibration_images": 64,
}


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SANDBOX, ignore_errors=True)


@pytest.fixture(scope="session")
def digits_dir() -> Path:
    from visionflow.data.digits import materialize_digits

    return materialize_digits(_SANDBOX / "digits")


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[str]:
    """`vflow server start` on a free loopback port with its own database: the one real
    Prefect server of the session's flow tests (one per process: Prefect's event worker is a
    process-wide singleton bound to the first API it sends to); its API URL. Flow
    subprocesses get it as PREFECT_API_URL, flows in this process run under
    `prefect_settings(url)`. `vflow server stop` at the end must leave no process behind."""
    import json

    from visionflow.pipeline.servers import _alive

    base = _SANDBOX / "prefect-server"
    base.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_HOME": str(base / "home"),
           "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "2",
           "PREFECT_SERVER_LOGGING_LEVEL": "WARNING"}
    vflow = str(BIN / "vflow")
    state_file = base / ".cache" / "servers" / "prefect.json"
    try:
        start = subprocess.run([vflow, "server", "start", "--root", str(base), "--port", "0",
                                "--no-ui", "--timeout", "240"], env=env, capture_output=True,
                               text=True, timeout=300)
        assert start.returncode == 0, start.stdout + start.stderr
        status = subprocess.run([vflow, "server", "status", "--root", str(base)],
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0 and "up at http://127.0.0.1:" in status.stdout
        yield json.loads(state_file.read_text())["url"] + "/api"
    finally:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        for worker in (EventsWorker, APILogWorker):  # bounded: never wait on a dead run
            with contextlib.suppress(Exception):
                worker.drain_all(timeout=10)
        pid = json.loads(state_file.read_text())["pid"] if state_file.exists() else None
        stop = subprocess.run([vflow, "server", "stop", "--root", str(base)],
                              capture_output=True, text=True, timeout=90)
        if pid is not None:
            assert "stopped" in stop.stdout, stop.stdout + stop.stderr
            if _alive(pid, "prefect"):
                os.kill(pid, 9)
                pytest.fail(f"prefect server pid {pid} survived `vflow server stop`")


@contextlib.contextmanager
def prefect_settings(api_url: str) -> Iterator[None]:
    """Flows run in this process talk to the server at `api_url`."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}):
        yield


def write_params(path: Path, overrides: dict) -> None:
    from visionflow.core.configfile import apply_overrides, read_params_file

    raw = apply_overrides(read_params_file(REPO / "params.yaml"), overrides)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def make_project(
    root: Path, data_src: Path, overrides: dict | None = None, git: bool = False
) -> Path:
    """A project directory like a fresh clone: params, dvc.yaml, flows/, src/ and data/."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", "flows", "src", "presets"):
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy)(
            src,
            root / name,
            **(
                {"ignore": shutil.ignore_patterns("__pycache__", "*.egg-info")}
                if src.is_dir()
                else {}
            ),
        )
    if data_src.is_dir():
        shutil.copytree(data_src, root / "data")
        source = "data"
    else:
        source = str(data_src)
    write_params(root / "params.yaml", {**TINY, "data.source": source, **(overrides or {})})
    (root / "mlruns").mkdir()
    if git:
        run(["git", "init", "-q", "-b", "main"], root)
        shutil.copy(REPO / ".gitignore", root / ".gitignore")
        run([str(BIN / "dvc"), "init", "-q"], root)
        if (root / "data").is_dir():
            run([str(BIN / "dvc"), "add", "-q", "data"], root)
        run(["git", "add", "-A"], root)
        run(["git", "commit", "-q", "-m", "init"], root)
    return root


def run(cmd: list[str], cwd: Path, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def project(tmp_path: Path, digits_dir: Path) -> Path:
    return make_project(tmp_path / "proj", digits_dir)
