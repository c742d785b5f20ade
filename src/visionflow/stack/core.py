"""The stack as a whole: credentials (generated once), ports and pids (`stack.json`), start
order, the client environment (`env.sh`), status and stop.

    stack = Stack(Layout.at("."))
    stack.up(Options(workers=1))      # idempotent: starts what is not running
    stack.client_env()                # MLFLOW_TRACKING_URI, PREFECT_API_URL, ...
    stack.down()
"""

from __future__ import annotations

import json
import secrets
import shlex
import shutil
import socket
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from visionflow.core.env import QUIET
from visionflow.core.files import write_json, write_text
from visionflow.core.layout import Layout
from visionflow.mlops.tracking import PROXY_ONLY
from visionflow.orchestration.servers import free_port, port_free
from visionflow.stack import objectstore, postgres, procs, services
from visionflow.stack.procs import StackError

SERVICES = ("postgres", "s3", "mlflow", "prefect")
LOCK_URL_VAR = "VFLOW_REGISTRY_LOCK_URL"
TUNE_STORAGE_VAR = "VFLOW_TUNE_STORAGE"  # `vflow tune` on every host shares one Optuna study
DVC_REMOTE_URL = "s3://dvc/store"


@dataclass
class Credentials:
    admin: str
    mlflow: str
    prefect: str
    registry_lock: str
    s3_access_key: str
    s3_secret_key: str
    optuna: str = ""  # added after the first stacks: generated when an older file lacks it

    @classmethod
    def generate(cls) -> Credentials:
        def tok() -> str:
            return secrets.token_urlsafe(18)

        return cls(tok(), tok(), tok(), tok(), "vflow" + secrets.token_hex(8), tok(), tok())

    @classmethod
    def load_or_create(cls, layout: Layout) -> tuple[Credentials, bool]:
        path = layout.stack_credentials
        if path.is_file():
            values = dict(line.removeprefix("export ").split("=", 1)
                          for line in path.read_text().splitlines()
                          if "=" in line and not line.startswith("#"))
            try:
                creds = cls(**{k.lower(): shlex.split(v)[0] for k, v in values.items()})
            except (TypeError, IndexError, ValueError):
                raise StackError(f"{path}: unreadable credentials file (delete it with the "
                                 "stack's data: `vflow stack down --purge`)") from None
            if creds.optuna:
                return creds, False
            creds.optuna = cls.generate().optuna
        else:
            creds = cls.generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = ["# vflow stack credentials: generated once, never committed (.cache/)"]
        lines += [f"{k.upper()}={shlex.quote(v)}" for k, v in asdict(creds).items()]
        write_text(path, "\n".join(lines) + "\n")
        path.chmod(0o600)
        return creds, True

    def passwords(self) -> dict[str, str]:
        return {"mlflow": self.mlflow, "prefect": self.prefect, "optuna": self.optuna,
                postgres.LOCK_ROLE: self.registry_lock}


@dataclass
class Options:
    host: str = "127.0.0.1"
    workers: int = 1
    ui: bool = True
    deploy: bool = True
    timeout: float = 300.0


@dataclass
class ServiceStatus:
    name: str
    running: bool
    healthy: bool
    pid: int | None
    url: str
    note: str = ""

    def line(self) -> str:
        state = "up" if self.healthy else ("running, not answering" if self.running
                                           else "down")
        pid = f" (pid {self.pid})" if self.pid else ""
        return f"{self.name:<9} {state:<8} {self.url}{pid}{f'  {self.note}' if self.note else ''}"


@dataclass
class Stack:
    layout: Layout
    base_env: dict[str, str] | None = None  # the environment services start from (os.environ)
    state: dict[str, Any] = field(default_factory=dict)
    _live: dict[str, subprocess.Popen] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        try:
            self.state = json.loads(self.layout.stack_state.read_text())
        except (OSError, ValueError):
            self.state = {}
        self.state.setdefault("ports", {})
        self.state.setdefault("pids", {})

    # ---------------------------------------------------------------- addresses

    @property
    def host(self) -> str:
        return str(self.state.get("host", "127.0.0.1"))

    def port(self, name: str) -> int:
        try:
            return int(self.state["ports"][name])
        except KeyError:
            raise StackError(f"{self.layout.stack_state}: no {name} port recorded; run "
                             "`vflow stack up` first") from None

    def cluster(self) -> postgres.Cluster:
        return postgres.Cluster(self.layout.stack_pgdata, self.layout.stack_log("postgres"),
                                self.layout.stack_pg_pwfile, self.host, self.port("postgres"))

    def url(self, name: str) -> str:
        if name == "postgres":
            return f"postgresql://{self.host}:{self.port('postgres')}"
        return f"http://{self.host}:{self.port(name)}"

    def credentials(self) -> Credentials:
        return Credentials.load_or_create(self.layout)[0]

    def client_env(self) -> dict[str, str]:
        """What a client host needs: the tracking and Prefect URLs, the registry lock, and
        S3 keys for DVC (MLflow clients need none: the tracking server proxies artifacts)."""
        c = self.credentials()
        lock = self.cluster().url(postgres.LOCK_ROLE, c.registry_lock, postgres.LOCK_DB)
        tune = self.cluster().url("optuna", c.optuna, "optuna", "postgresql+psycopg")
        return {"MLFLOW_TRACKING_URI": self.url("mlflow"),
                "PREFECT_API_URL": self.url("prefect") + "/api",
                LOCK_URL_VAR: lock, TUNE_STORAGE_VAR: tune,
                "AWS_ACCESS_KEY_ID": c.s3_access_key, "AWS_SECRET_ACCESS_KEY": c.s3_secret_key,
                "AWS_ENDPOINT_URL": self.url("s3"), **objectstore.CLIENT_ENV,
                **PROXY_ONLY}

    # ---------------------------------------------------------------- state

    def _save(self) -> None:
        write_json(self.layout.stack_state, self.state)

    def _record(self, name: str, pid: int | None) -> None:
        if pid is None:
            self.state["pids"].pop(name, None)
        else:
            self.state["pids"][name] = pid
        self._save()

    def _pid(self, name: str) -> int | None:
        if name == "postgres":
            return self.cluster().pid() if self.state["ports"].get("postgres") else None
        pid = self.state["pids"].get(name)
        return int(pid) if pid else None

    @staticmethod
    def _marker(name: str) -> str:
        return {"s3": objectstore.MARKER, "mlflow": services.MLFLOW_MARKER,
                "prefect": services.PREFECT_MARKER}.get(name, services.WORKER_MARKER)

    def running(self, name: str) -> bool:
        pid = self._pid(name)
        return pid is not None and (name == "postgres" or procs.alive(pid, self._marker(name)))

    def healthy(self, name: str) -> bool:
        if not self.state["ports"].get(name):
            return False
        if name in ("postgres", "s3"):
            return procs.tcp_answers(self.host, self.port(name))
        path = "/health" if name == "mlflow" else "/api/health"
        return procs.http_answers(self.url(name) + path)

    def workers(self) -> list[str]:
        return sorted(n for n in self.state["pids"] if n.startswith("worker-"))

    # ---------------------------------------------------------------- up

    def up(self, opts: Options | None = None, log=print) -> bool:
        """Start every service that is not running; returns True when the credentials were
        generated by this call (then, and only then, they are printed)."""
        opts = opts or Options()
        if self.state.get("host") and self.state["host"] != opts.host and any(
                self.running(s) for s in SERVICES):
            raise StackError(f"the stack runs on {self.host}; `vflow stack down` before "
                             f"moving it to {opts.host}")
        self.state["host"] = opts.host
        self.state["ui"] = opts.ui  # a server restarted later (start_service) keeps it
        creds, created = Credentials.load_or_create(self.layout)
        for name in SERVICES:
            if not self.state["ports"].get(name) or not self.running(name) and not \
                    port_free(self.host, self.state["ports"][name]):
                self.state["ports"][name] = free_port(self.host)
        self._save()
        t0 = time.perf_counter()
        self._postgres(creds, opts.timeout)
        self.start_service("s3", opts.timeout, creds)
        pending = [n for n in ("mlflow", "prefect") if not self.healthy(n)]
        for name in pending:  # both boot at once; then wait for each
            self._spawn(name, creds, opts)
        for name in pending:
            self._wait(name, opts.timeout)
        log(f"servers up in {time.perf_counter() - t0:.1f} s")
        self.write_env()
        if opts.deploy and self.layout.prefect_yaml.is_file():
            env = {**self._env(), **self.client_env()}
            services.create_pool(env, self.layout.root)
            services.deploy(env, self.layout.root)
            log(f"work pool {services.POOL}: deployments of {self.layout.prefect_yaml.name}")
        for i in range(1, opts.workers + 1):
            self.start_worker(f"worker-{i}", opts.timeout)
        self.configure_dvc(creds)
        return created

    def _postgres(self, creds: Credentials, timeout: float) -> None:
        cluster = self.cluster()
        if not cluster.initialised:
            cluster.init(creds.admin)
        if cluster.pid() is None:
            cluster.start(timeout)
        cluster.provision(creds.admin, creds.passwords())

    def _env(self) -> dict[str, str]:
        return procs.same_session_env(QUIET, self.base_env)

    def _spawn(self, name: str, creds: Credentials, opts: Options) -> None:
        base = self._env()
        if name == "s3":
            objectstore.make_buckets(self.layout.stack_buckets)
            cmd = objectstore.command(self.layout.stack_buckets, self.host, self.port("s3"))
            env = {**base, **objectstore.server_env(creds.s3_access_key, creds.s3_secret_key)}
        elif name == "mlflow":
            backend = self.cluster().url("mlflow", creds.mlflow, "mlflow")
            cmd = services.mlflow_command(self.host, self.port("mlflow"))
            env = {**base, **objectstore.CLIENT_ENV, **services.mlflow_env(
                backend, self.url("s3"), creds.s3_access_key, creds.s3_secret_key)}
        else:
            db = self.cluster().url("prefect", creds.prefect, "prefect", "postgresql+asyncpg")
            cmd = services.prefect_command(self.host, self.port("prefect"), opts.ui)
            env = {**base, **services.prefect_env(db, self.layout.stack_prefect_home,
                                                  f"{self.url('prefect')}/api")}
        proc = procs.spawn(cmd, self.layout.stack_log(name), env, self.layout.root)
        self._record(name, proc.pid)
        self._live[name] = proc

    def _wait(self, name: str, timeout: float) -> None:
        proc = self._live.pop(name, None)
        procs.wait_until(lambda: self.healthy(name), f"{name} server on {self.url(name)}",
                         timeout, self.layout.stack_log(name), proc)

    def start_service(self, name: str, timeout: float = 300.0,
                      creds: Credentials | None = None, ui: bool | None = None) -> None:
        """Start one server if it is not up (after `kill_service`, for instance)."""
        if name == "postgres":
            cluster = self.cluster()
            if cluster.pid() is None:
                cluster.start(timeout)
            return
        if self.healthy(name) and self.running(name):
            return
        ui = self.state.get("ui", True) if ui is None else ui  # as `up` started it
        self._spawn(name, creds or self.credentials(), Options(host=self.host, ui=ui))
        self._wait(name, timeout)

    def start_worker(self, name: str, timeout: float = 300.0) -> None:
        """A process worker on the stack's pool, running flows in this checkout."""
        if self.running(name):
            return
        env = {**self._env(), **self.client_env(), "VFLOW_CHECKOUT": str(self.layout.root)}
        label = f"{socket.gethostname()}-{self.layout.root.name}-{name}"
        proc = procs.spawn(services.worker_command(label, queue=services.QUEUE),
                           self.layout.stack_log(name), env, self.layout.root)
        self._record(name, proc.pid)
        procs.wait_until(lambda: label in services.workers_online(self.url("prefect") + "/api"),
                         f"worker {label}", timeout, self.layout.stack_log(name), proc)

    # ---------------------------------------------------------------- down, faults

    def stop_service(self, name: str, timeout: float = 10.0) -> bool:
        if name == "postgres":
            return bool(self.state["ports"].get("postgres")) and self.cluster().stop()
        stopped = procs.stop(self._pid(name), self._marker(name), timeout)
        self._record(name, None)
        return stopped

    def kill_service(self, name: str) -> bool:
        """SIGKILL, as a crash would (the fault drills)."""
        if name == "postgres":
            return self.cluster().stop("immediate")
        killed = procs.kill(self._pid(name), self._marker(name))
        self._record(name, None)
        return killed

    def restart_postgres(self) -> None:
        cluster = self.cluster()
        cluster.stop("fast")
        cluster.start()

    def down(self, log=print, grace: float = 10.0, purge: bool = False) -> None:
        """Stop the workers and servers (SIGTERM, SIGKILL after `grace` s). `purge`: the
        data goes too, so PostgreSQL stops without its shutdown checkpoint."""
        for name in [*reversed(self.workers()), "prefect", "mlflow", "s3", "postgres"]:
            if name not in self.state["ports"] and not name.startswith("worker-"):
                continue
            t0 = time.perf_counter()
            if name == "postgres":
                was = bool(self.state["ports"].get(name)) and self.cluster().stop(
                    "immediate" if purge else "fast")
            else:
                was = self.stop_service(name, grace)
            log(f"{name}: {'stopped' if was else 'was not running'} "
                f"({time.perf_counter() - t0:.1f} s)")
        if purge:
            shutil.rmtree(self.layout.stack_dir, ignore_errors=True)

    def status(self) -> list[ServiceStatus]:
        out = []
        for name in [*SERVICES, *self.workers()]:
            if name.startswith("worker-"):
                run = self.running(name)
                out.append(ServiceStatus(name, run, run, self._pid(name), self.url("prefect")))
                continue
            if not self.state["ports"].get(name):
                out.append(ServiceStatus(name, False, False, None, "-", "never started"))
                continue
            out.append(ServiceStatus(name, self.running(name), self.healthy(name),
                                     self._pid(name), self.url(name)))
        return out

    # ---------------------------------------------------------------- client side

    def write_env(self) -> None:
        lines = ["# vflow stack: `source` me to use the stack from a shell (secrets: keep "
                 "private)"]
        lines += [f"export {k}={shlex.quote(v)}" for k, v in self.client_env().items()]
        write_text(self.layout.stack_env, "\n".join(lines) + "\n")
        self.layout.stack_env.chmod(0o600)

    def configure_dvc(self, creds: Credentials) -> bool:
        """The DVC remote `stack` on this store as the default (see `configure_dvc_remote`)."""
        if not self.layout.dvc_dir.is_dir():
            return False
        configure_dvc_remote(self.layout, self.url("s3"), creds.s3_access_key,
                             creds.s3_secret_key)
        return True


def configure_dvc_remote(layout: Layout, endpoint: str, access_key: str,
                         secret_key: str) -> None:
    """The DVC remote `stack` (s3://dvc/store at `endpoint`) as the default, in
    `.dvc/config.local` (git-ignored): the committed config is left alone."""
    from dvc.config import Config

    with Config(str(layout.dvc_dir)).edit("local") as conf:
        conf["remote"]["stack"] = {"url": DVC_REMOTE_URL, "endpointurl": endpoint,
                                   "access_key_id": access_key,
                                   "secret_access_key": secret_key}
        conf["core"]["remote"] = "stack"
