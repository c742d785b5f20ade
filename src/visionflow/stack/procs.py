"""Detached service processes: started in their own session with a log, recorded by pid,
checked by a health probe, stopped by process group."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from visionflow.core.errors import VisionflowError
from visionflow.orchestration.servers import _alive, _kill_group, _tail


class StackError(VisionflowError):
    exit_code = 1


def spawn(cmd: Sequence[str], log: Path, env: Mapping[str, str], cwd: Path,
          user: str | None = None) -> subprocess.Popen:
    """Start `cmd` in a new session, output appended to `log` (as `user` when given)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        out.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        out.flush()
        try:
            return subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=cwd, env=dict(env),
                                    start_new_session=True, user=user)
        except OSError as err:
            raise StackError(f"{cmd[0]}: cannot start ({err.strerror or err})") from None


def wait_until(ready: Callable[[], bool], what: str, timeout: float, log: Path,
               proc: subprocess.Popen | None = None) -> None:
    """Poll `ready` until true; fail with the log's tail when the process exits first or
    `timeout` passes (the process is then stopped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise StackError(f"{what} exited with code {proc.returncode} before answering; "
                             f"{log}: {_tail(log)}")
        if ready():
            return
        time.sleep(0.25)
    if proc is not None:
        _kill_group(proc.pid, 10)
    raise StackError(f"{what} did not answer within {timeout:.0f} s; {log}: {_tail(log)}")


def http_answers(url: str, timeout: float = 2.0, any_status: bool = False) -> bool:
    """True when `url` answers 2xx (or any HTTP status with `any_status`)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (our servers)
            return 200 <= resp.status < 300
    except urllib.error.HTTPError:
        return any_status
    except (OSError, ValueError):
        return False


def tcp_answers(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def alive(pid: int | None, marker: str) -> bool:
    return bool(pid) and _alive(int(pid), marker)  # type: ignore[arg-type]


def stop(pid: int | None, marker: str, timeout: float = 30.0) -> bool:
    """SIGTERM the process group of `pid` (SIGKILL after `timeout`); True if it was running."""
    if not alive(pid, marker):
        return False
    _kill_group(int(pid), timeout)  # type: ignore[arg-type]
    return True


def kill(pid: int | None, marker: str) -> bool:
    """SIGKILL the process group at once, as a crash would (fault drills)."""
    if not alive(pid, marker):
        return False
    pid = int(pid)  # type: ignore[arg-type]
    try:
        if os.getpgid(pid) == pid:  # a group we started (start_new_session): all of it
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(pid, ""):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
        time.sleep(0.05)
    return True


def tail(log: Path, lines: int = 5) -> str:
    return _tail(log, lines)


CLIENT_VARS = ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI",
               "VFLOW_REGISTRY_LOCK_URL", "VFLOW_TUNE_STORAGE", "VFLOW_CHECKOUT")


def same_session_env(extra: Mapping[str, str] | None = None,
                     base: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (this process's environment) without the client variables that would point a
    server at another stack, plus `extra`."""
    env = {k: v for k, v in (os.environ if base is None else base).items()
           if k not in CLIENT_VARS}
    env.update(extra or {})
    return env
