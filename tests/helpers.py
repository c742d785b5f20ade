"""What the test modules share that is not a fixture: the repository and venv paths,
`run` (a command that must succeed), a fresh project (`make_project`, `write_params`, the
small `TINY` params) and Prefect settings for in-process flows. No tests, no fixtures here
(those stay in conftest.py)."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import yaml
from mlflow_store import seed_store

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SHARED_CIFAR = REPO.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"

# Small and fast: the whole pipeline on a digits subset in seconds.
TINY = {
    "data.image_size": 16,
    "train.model": "fast",
    "train.lr": 0.5,
    "train.epochs": 2,
    "train.batch_size": 64,
    "train.threads": 1,
    "train.deterministic": True,
    "compress.calibration_images": 64,
}


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
    root: Path, data_src: Path, overrides: dict | None = None, git: bool = False,
    mlflow_store: bool = True,
) -> Path:
    """A project directory like a fresh clone: params, dvc.yaml, flows/, src/ and data/; with
    `mlflow_store` an empty MLflow store as its first run would make (without, no registry)."""
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
    if mlflow_store:
        seed_store(root / "mlruns")  # an empty MLflow store, without its seconds of migrations
    else:
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


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` for a block (tests that compare exact numbers)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def job_runners(pid: int) -> list[str]:
    """MLflow's GenAI job runner processes (huey consumers) under the server `pid`."""
    import psutil

    return [" ".join(p.cmdline()) for p in psutil.Process(pid).children(recursive=True)
            if "mlflow.server.jobs" in " ".join(p.cmdline())]


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], what: str,
              timeout: float = 300, poll: float = 0.02,
              detail: Callable[[], str] = lambda: "") -> None:
    """SIGKILL `proc` and every process under it once `ready()`: torchrun and its ranks
    too, each in a session of its own (a group kill of `proc` never reached them). When
    `ready()` first says so, the whole tree is stopped (SIGSTOP) and `ready()` asked again: a
    file written between the first look and the stop (the epoch's end after a mid-epoch
    checkpoint) is seen, and the tree goes on (SIGCONT) unless it still holds. So what the
    test reads after the kill is what `ready()` last saw. Fails naming `what` (and
    `detail()`, e.g. the process's log) if the process ends first or the time runs out."""
    import signal
    import time

    deadline = time.monotonic() + timeout
    try:
        while True:
            while not ready():
                assert proc.poll() is None, f"the process ended before {what}: {detail()}"
                assert time.monotonic() < deadline, f"no {what} in {timeout:.0f} s: {detail()}"
                time.sleep(poll)
            tree = _signal_tree(proc.pid, signal.SIGSTOP)
            time.sleep(0.05)  # the stop takes effect on every process
            tree += _signal_tree(proc.pid, signal.SIGSTOP, skip=tree)  # any started since
            if ready():
                break
            _signal_all(tree, signal.SIGCONT)
        _signal_all(tree, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            _signal_tree(proc.pid, signal.SIGKILL)
            proc.wait(30)


def _signal_tree(pid: int, sig: int, skip: list | None = None) -> list:
    """Send `sig` to `pid` and its descendants (those not in `skip`); the processes."""
    import psutil

    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    tree = [p for p in tree if p not in (skip or [])]
    _signal_all(tree, sig)
    return tree


def _signal_all(procs: list, sig: int) -> None:
    import psutil

    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(sig)
