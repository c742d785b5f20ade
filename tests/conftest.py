"""Shared fixtures: every test runs in temp dirs with its own HOME, Prefect home, DVC site
cache and MLflow store, no network, telemetry off."""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import os
import shutil
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

# Two pytest workers share two cores (`make test -n 2`): torch, OpenMP and ONNX Runtime in
# every test process and in every process a test starts get one thread each, so that no
# process spins on a core another one needs (TINY's `train.threads` agrees).
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"

from helpers import BIN, make_project  # noqa: E402

# `import dvc` binds DVC's log handlers to the sys.stdout/stderr of that moment: here, the
# session's capture streams. Imported first inside a test using capsys, they would hold that
# test's stream, closed afterwards, and a later in-process flow's DVC warning would raise.
# The GPU machine has no DVC (nor MLflow, Prefect, pydantic): `pytest -m gpu` on the
# torch-only test files must still collect there (bench/gpu_bench.py step 5).
with contextlib.suppress(ImportError):
    import dvc  # noqa: F401
pytest_plugins = ["stack_fixtures"]  # the team stack, once per session (`-m stack` tests)
if importlib.util.find_spec("xdist") is not None:
    pytest_plugins.append("worker_units")  # how `make test`'s two workers share the tests


_SANDBOX = Path(tempfile.mkdtemp(prefix="vflow-tests-"))
for _key, _value in {
    "HOME": str(_SANDBOX / "home"),
    "XDG_CONFIG_HOME": str(_SANDBOX / "home" / ".config"),
    "XDG_CACHE_HOME": str(_SANDBOX / "home" / ".cache"),
    "MPLCONFIGDIR": str(_SANDBOX / "mpl"),
    "PREFECT_HOME": str(_SANDBOX / "prefect"),
    "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(_SANDBOX / "prefect" / "results"),
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


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SANDBOX, ignore_errors=True)


def pytest_collection_finish(session):
    """What collection imported (torch, MLflow, Prefect, DVC) lives for the session: moved
    out of the cycle collector's passes, as `core.env.imports_without_gc` does for a stage."""
    gc.freeze()


# `make test` runs two pytest workers (tests/worker_units.py): the longest units first, so
# that no worker is left alone with a long one at the end (from a serial run's `--durations`).
LONGEST_FIRST = ["stack", "tests/segmentation/test_segmentation_pipeline.py",
                 "tests/pipeline/test_flow.py", "tests/pipeline/test_e2e.py",
                 "tests/pipeline/test_photos.py", "tests/pipeline/test_retrain_e2e.py",
                 "tests/stages/test_train.py", "tests/bench/test_gpu_bench.py",
                 "tests/pipeline/test_tune.py", "tests/stages/test_compress_stage.py",
                 "tests/base/test_runtime_params.py"]


def pytest_collection_modifyitems(config, items):
    from worker_units import STACK_FILES, unit

    misplaced = [i.nodeid for i in items if i.get_closest_marker("stack")
                 and unit(i.nodeid) != "stack"]
    if misplaced:
        raise pytest.UsageError(f"{misplaced[0]}: a `stack` test belongs in {STACK_FILES}")
    if hasattr(config, "workerinput"):  # a worker: the order the units are handed out in
        rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(unit(item.nodeid), len(rank)))  # stable


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

    from visionflow.orchestration.servers import _alive

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
        if start.returncode != 0:  # seen once: Prefect's own "Reactive triggers not
            log = base / ".cache" / "servers" / "prefect.log"  # started": its cause is above
            text = log.read_text(errors="replace") if log.is_file() else ""
            pytest.fail(f"{start.stdout}{start.stderr}\nserver log:\n{text[-6000:]}")
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


@pytest.fixture
def project(tmp_path: Path, digits_dir: Path) -> Path:
    return make_project(tmp_path / "proj", digits_dir)


@pytest.fixture
def no_network(monkeypatch) -> Iterator[None]:
    """Every download through a closed local proxy, so that it fails at once. urllib builds
    its process-wide opener, proxies included, on first use: it is reset before (so that the
    dead proxy is used) and after (a later test's loopback request went to the dead proxy and
    got "Connection refused" while its server listened: the serve flake of sessions 15-16)."""
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    urllib.request.install_opener(None)
    yield
    urllib.request.install_opener(None)

