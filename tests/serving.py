"""`mlflow models serve` of a project's champion on a free loopback port, for the serving
tests (no tests here)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from helpers import BIN

from visionflow.core.layout import Layout

NAME = "visionflow-classifier"
START_TIMEOUT_S = 180


def log_tail(text: str, chars: int = 3000) -> str:
    """The end of a server log without MLflow's download progress bar (one line thousands of
    characters long, `\r`-separated), which would fill the tail."""
    kept = [ln for ln in text.splitlines() if "Downloading artifacts" not in ln]
    return "\n".join(kept)[-chars:]


def stacks(pgid: int) -> str:
    """Where each process of the group is (py-spy dump), for a server that is slow to start:
    the start-up flake seen in sessions 15-16 said only that the CLI was late."""
    spy = shutil.which("py-spy", path=str(BIN))
    if spy is None:
        return "(no py-spy)"
    pids = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True).stdout
    dumps = [subprocess.run([spy, "dump", "--pid", pid], capture_output=True, text=True,
                            timeout=30).stdout for pid in pids.split()]
    return "\n".join(dumps)


def sockets(port: int, pgid: int) -> str:
    """What the kernel holds on `port`, and whether the server is in this test's network
    namespace (a listening server refusing the ping was seen in session 16)."""
    held = subprocess.run(["ss", "-tanpe", f"( sport = :{port} or dport = :{port} )"],
                          capture_output=True, text=True).stdout
    pids = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True).stdout
    spaces = {pid: os.readlink(f"/proc/{pid}/ns/net") for pid in pids.split()
              if os.path.exists(f"/proc/{pid}")}
    return f"{held}\nnet namespaces: test {os.readlink('/proc/self/ns/net')}, server {spaces}"


def _diagnosed(how, *args) -> str:
    """A diagnostic for the failure message; never the reason the message is lost."""
    try:
        return how(*args)
    except (OSError, subprocess.SubprocessError) as e:
        return f"({how.__name__}: {type(e).__name__}: {e})"


def ping(url: str, timeout: float = 2.0) -> bool:
    return _ping(url, timeout) == "200"


def _ping(url: str, timeout: float = 2.0) -> str:
    """The `/ping` status, or why there was none."""
    try:
        with urllib.request.urlopen(f"{url}/ping", timeout=timeout) as r:
            return str(r.status)
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        return f"{type(e).__name__}: {e}"


@contextlib.contextmanager
def serve_champion(layout: Layout, log_path: Path, workers: int = 1) -> Iterator[str]:
    """The champion served by `mlflow models serve` (local env); its base URL. The server
    and its workers are stopped afterwards (SIGTERM, then SIGKILL)."""
    with serve_uri(layout, f"models:/{NAME}@champion", log_path, workers) as url:
        yield url


@contextlib.contextmanager
def serve_uri(layout: Layout, model_uri: str, log_path: Path,
              workers: int = 1) -> Iterator[str]:
    """`model_uri` (of the project's store) served by `mlflow models serve`; its base URL."""
    from visionflow.mlops import tracking
    from visionflow.orchestration.servers import free_port

    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.tracking_uri(layout),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    url = f"http://127.0.0.1:{port}"
    with log_path.open("w+") as log:
        proc = subprocess.Popen(
            [str(BIN / "mlflow"), "models", "serve", "-m", model_uri,
             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port),
             "-w", str(workers)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            start, early = time.monotonic(), ""
            while (status := _ping(url)) != "200":
                waited = time.monotonic() - start
                if not early and waited > START_TIMEOUT_S / 3:  # where a slow start is
                    early = f"after {waited:.0f} s:\n{_diagnosed(stacks, proc.pid)}"
                if proc.poll() is not None or waited > START_TIMEOUT_S:
                    log.seek(0)  # a flake seen under load: say what the ping got and where
                    raise AssertionError(  # the server's processes were
                        f"server not up after {waited:.0f} s (rc={proc.poll()}, last ping: "
                        f"{status}):\n{log_tail(log.read())}\n{early}\n"
                        f"after {waited:.0f} s:\n{_diagnosed(stacks, proc.pid)}\n"
                        f"{_diagnosed(sockets, port, proc.pid)}")
                time.sleep(0.5)
            yield url
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
