"""The process environment every tool we drive gets (telemetry off, quiet progress bars), and
what this machine is (for model cards and benchmark reports)."""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

QUIET = {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "GX_ANALYTICS_ENABLED": "false",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "GIT_PYTHON_REFRESH": "quiet",
}

# MLflow's server starts a job runner for its GenAI features (six huey consumer processes,
# about 250 MB and a steady trickle of CPU each); visionflow's servers run without it.
MLFLOW_SERVER = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


_PR_SET_PDEATHSIG = 1  # prctl(2)


def on_parent_death(sig: int, parent: int | None = None) -> Callable[[], None]:
    """A call that has the kernel send the calling process `sig` when the process that
    started it ends, however it ends (Linux; elsewhere it does nothing). A SIGKILLed train
    stage otherwise leaves torchrun, and torchrun its ranks, training on into the outputs
    beside the retry. `parent`: the pid expected as the parent (gone already: `sig` now).
    libc is looked up here, so the call is safe between fork and exec (`preexec_fn`)."""
    if not sys.platform.startswith("linux"):
        return lambda: None
    import ctypes

    prctl = ctypes.CDLL(None).prctl

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if parent is not None and os.getppid() != parent:
            os.kill(os.getpid(), sig)

    return arm


def quiet_env() -> None:
    """Telemetry off for every tool we drive (values the user set are kept)."""
    for key, value in QUIET.items():
        os.environ.setdefault(key, value)


def pause_gc() -> bool:
    """Pause Python's cycle collector for heavy imports; True when this call paused it
    (a caller's own choice to run without it is left alone). `resume_gc` undoes it."""
    if not gc.isenabled():
        return False
    gc.disable()
    return True


def resume_gc(paused: bool) -> None:
    """After `pause_gc`: what the imports made moves out of the collector's later passes
    (`gc.freeze`), and the collector is on again."""
    if paused:
        gc.freeze()
        gc.enable()


@contextlib.contextmanager
def imports_without_gc() -> Iterator[None]:
    """The heavy imports (torch, torchvision, MLflow) with the cycle collector paused, and
    what they made moved out of its later passes.

    They create about a million objects that live as long as the process. The collector
    walks them all again and again while they load, and then on every full pass while the
    stage works: a quarter of a stage process's CPU on the digits (BENCHMARKS.md, "Stage
    start-up"). Imports make no garbage worth collecting, so the collector is off for them
    and back on, as it was, before any work."""
    paused = pause_gc()
    try:
        yield
    finally:
        resume_gc(paused)


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what `platform` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware() -> str:
    """This machine: CPU model and cores, GPU name when CUDA is there, torch version."""
    import torch  # not at the top: `vflow --help` imports this module

    parts = [f"{cpu_name()} ({os.cpu_count()} cores)"]
    if torch.cuda.is_available():
        parts.append(torch.cuda.get_device_name(0))
    parts.append(f"torch {torch.__version__}, {platform.system()} {platform.release()}")
    return "; ".join(parts)
