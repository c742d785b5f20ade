"""Local servers on 127.0.0.1 for a project: the Prefect API/UI and the MLflow UI.

`vflow server start|stop|status` and `vflow ui start|stop|status` manage one detached
process each, with its pid, log and URL under `.cache/servers/` in the project, and a
health check over HTTP (`/api/health` for Prefect, `/health` for MLflow).

`prefect_api()` is what every entry point wraps the flow in: it uses `PREFECT_API_URL`
(or the project's running `vflow server`) when set, checks that it answers, and otherwise
leaves Prefect to start its temporary (ephemeral) API in-process; our errors show on the
console as their one line (`stdio.user_errors_untraced`).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from visionflow.core.env import MLFLOW_SERVER, quiet_env
from visionflow.core.errors import VisionflowError
from visionflow.core.layout import Layout
from visionflow.mlops.tracking import tracking_uri
from visionflow.orchestration import stdio

HOST = "127.0.0.1"


@dataclass(frozen=True)
class Service:
    name: str  # "prefect" or "mlflow": the state file names
    title: str
    default_port: int
    health_path: str
    marker: str  # must appear in the process command line (guards against pid reuse)
    start_timeout_s: float  # how long a start waits for the health check

    def command(self, layout: Layout, host: str, port: int, ui: bool = True) -> list[str]:
        if self.name == "prefect":
            # `prefect server start`, with a fix for SQLAlchemy 2.1 (see prefect_compat)
            return [sys.executable, "-m", "visionflow.orchestration.prefect_compat", "server",
                    "start", "--host", host, "--port", str(port), "--analytics-off",
                    *([] if ui else ["--no-ui"])]

        uri = tracking_uri(layout)
        if not uri.startswith("sqlite:") and "://" in uri and not uri.startswith("file:"):
            raise VisionflowError(f"MLFLOW_TRACKING_URI={uri}: already a tracking server, "
                                  "open it in a browser instead")
        return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
                "--host", host, "--port", str(port), "--workers", "1"]


# a fresh Prefect database migrates on the first start: about 30 s on 2 quiet cores
PREFECT = Service("prefect", "Prefect server", 4200, "/api/health", "prefect", 180.0)
MLFLOW = Service("mlflow", "MLflow UI", 5000, "/health", "mlflow", 120.0)


@dataclass
class Status:
    service: Service
    running: bool
    healthy: bool
    pid: int | None
    url: str | None
    log: Path
    note: str = ""

    @property
    def api_url(self) -> str | None:
        if self.url is None:
            return None
        return self.url + "/api" if self.service is PREFECT else self.url

    def line(self) -> str:
        if self.healthy:
            extra = f", PREFECT_API_URL={self.api_url}" if self.service is PREFECT else ""
            return f"{self.service.title}: up at {self.url} (pid {self.pid}{extra})"
        if self.running:
            return (f"{self.service.title}: pid {self.pid} running but {self.url} does not "
                    f"answer; log {self.log}")
        return f"{self.service.title}: not running{f' ({self.note})' if self.note else ''}"


def state_dir(layout: Layout) -> Path:
    return layout.servers_dir


def _files(service: Service, layout: Layout) -> tuple[Path, Path]:
    d = state_dir(layout)
    return d / f"{service.name}.json", d / f"{service.name}.log"


def healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (loopback)
            return 200 <= resp.status < 300
    except (OSError, urllib.error.URLError, ValueError):
        return False


def _alive(pid: int, marker: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return True  # no /proc: trust the pid
    if Path(f"/proc/{pid}/stat").is_file():
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
        if state == "Z":
            return False
    return marker in cmd


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = HOST, tries: int = 64) -> int:
    """A free port below the kernel's ephemeral range (32768-60999 by default on Linux), so
    that an outgoing connection cannot take it between this check and the server's bind."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(tries if low > 21000 else 0):
        port = rng.randint(20000, low - 1)
        if port_free(host, port):
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def status(service: Service, layout: Layout) -> Status:
    state_file, log = _files(service, layout)
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        return Status(service, False, False, None, None, log)
    pid, url = int(state["pid"]), state["url"]
    running = _alive(pid, service.marker)
    ok = running and healthy(url + service.health_path)
    note = "" if running else f"stale state file {state_file}"
    return Status(service, running, ok, pid, url, log, note)


def start(service: Service, layout: Layout, host: str = HOST, port: int | None = None,
          timeout: float | None = None, ui: bool = True, env: dict[str, str] | None = None
          ) -> Status:
    """Start the server detached (own session), wait until its health check answers
    (`timeout`, default the service's `start_timeout_s`).

    `port=0` picks a free port, and picks again (up to 3 times) if the server loses it to
    another process before it binds."""

    quiet_env()
    timeout = service.start_timeout_s if timeout is None else timeout
    current = status(service, layout)
    if current.healthy:
        return current
    if current.running:
        raise VisionflowError(current.line() + "; stop it first (`vflow "
                              f"{'server' if service is PREFECT else 'ui'} stop`)")
    if port != 0:
        return _launch(service, layout, host, port or service.default_port, timeout, ui, env)
    for _ in range(2):
        with contextlib.suppress(_PortLost):
            return _launch(service, layout, host, free_port(host), timeout, ui, env)
    return _launch(service, layout, host, free_port(host), timeout, ui, env)


class _PortLost(VisionflowError):
    pass


def _launch(service: Service, layout: Layout, host: str, port: int, timeout: float, ui: bool,
            env: dict[str, str] | None) -> Status:
    if not port_free(host, port):
        raise _PortLost(f"{host}:{port} is already in use; pick another with --port")
    state_file, log = _files(service, layout)
    state_file.parent.mkdir(parents=True, exist_ok=True)
    url = f"http://{host}:{port}"
    cmd = service.command(layout, host, port, ui)
    child_env = {**(MLFLOW_SERVER if service is MLFLOW else {}), **os.environ, **(env or {})}
    child_env.pop("PREFECT_API_URL", None)  # the server must not talk to another one
    with open(log, "ab") as out:
        out.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=layout.root, env=child_env,
                                start_new_session=True)
    state = {"pid": proc.pid, "url": url, "host": host, "port": port, "log": str(log),
             "command": cmd, "started": time.time()}
    state_file.write_text(json.dumps(state, indent=1))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            state_file.unlink(missing_ok=True)
            tail = _tail(log)
            error = _PortLost if "address already in use" in tail.lower() else VisionflowError
            raise error(f"{service.title} exited with code {proc.returncode} before "
                        f"answering: {tail}")
        if healthy(url + service.health_path):
            return Status(service, True, True, proc.pid, url, log)
        time.sleep(0.5)
    _kill_group(proc.pid)
    state_file.unlink(missing_ok=True)
    raise VisionflowError(f"{service.title} did not answer at {url}{service.health_path} "
                          f"within {timeout:.0f} s (stopped it); log {log}: {_tail(log)}")


def stop(service: Service, layout: Layout, timeout: float = 30.0) -> Status:
    """SIGTERM the server's process group, SIGKILL after `timeout`; remove the state file."""
    current = status(service, layout)
    state_file, _ = _files(service, layout)
    if current.running and current.pid:
        _kill_group(current.pid, timeout)
    state_file.unlink(missing_ok=True)
    return current


def _kill_group(pid: int, timeout: float = 30.0) -> None:
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return
    target = pgid if pgid == pid else None  # only a group we created (start_new_session)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(target, sig) if target else os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + (timeout if sig == signal.SIGTERM else 10)
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)  # reap if it is our child
                if done:
                    return
            except ChildProcessError:
                pass
            if not _alive(pid, ""):
                return
            time.sleep(0.2)


def _tail(log: Path, lines: int = 5) -> str:
    try:
        text = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(t.strip() for t in text[-lines:] if t.strip())


def project_api_url(layout: Layout) -> str | None:
    """The API URL of this project's running `vflow server`, if it answers."""
    st = status(PREFECT, layout)
    return st.api_url if st.healthy else None


EPHEMERAL_TIMEOUT = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"


@contextmanager
def _temporary_api() -> Iterator[None]:
    """Prefect's temporary API, given as long to start as `vflow server start` gives a server
    (Prefect waits 20 s; a fresh database's migrations alone take longer on 2 cores). A
    timeout the user set (environment or profile) is kept. Its start failing is one line."""
    from prefect.settings import (
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        get_current_settings,
        temporary_settings,
    )

    ephemeral = get_current_settings().server.ephemeral
    wait = ({} if "startup_timeout_seconds" in ephemeral.model_fields_set
            else {PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: int(PREFECT.start_timeout_s)})
    with temporary_settings(wait):
        try:
            yield
        except RuntimeError as err:
            if "ephemeral Prefect API" not in str(err):
                raise
            waited = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
            raise VisionflowError(f"Prefect's temporary API did not start within {waited} s "
                                  f"({EPHEMERAL_TIMEOUT}): start a server with `vflow server "
                                  "start`, or allow it longer") from err


@contextmanager
def prefect_api(layout: Layout, require: bool = False) -> Iterator[str | None]:
    """Run the body against a running Prefect server when there is one.

    Uses `PREFECT_API_URL` (environment or Prefect profile), else the project's running
    `vflow server`; fails with one line if that server does not answer. With neither, yields
    None and Prefect starts its temporary API (unless `require`)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = PREFECT_API_URL.value() or None
    origin = "PREFECT_API_URL"
    if not url:
        url, origin = project_api_url(layout), "vflow server"
    if url is None:
        if require:
            raise VisionflowError("no Prefect server: start one with `vflow server start` "
                                  "(schedules need a real server, not the temporary one)")
        with _temporary_api(), stdio.user_errors_untraced():
            yield None
        return
    url = url.rstrip("/")
    if not healthy(url + "/health", timeout=5):
        raise VisionflowError(f"{origin}={url}: no Prefect server answers at {url}/health "
                              "(start one with `vflow server start`, or unset it)")
    with temporary_settings({PREFECT_API_URL: url}), stdio.user_errors_untraced():
        yield url
