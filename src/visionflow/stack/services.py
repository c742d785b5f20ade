"""The stack's Python services: the MLflow tracking server (backend store on PostgreSQL,
artifacts proxied to S3), the Prefect server (database on PostgreSQL), the process work pool
with the deployments of `prefect.yaml`, and workers."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from visionflow.core.env import MLFLOW_SERVER
from visionflow.stack.procs import StackError

POOL = "visionflow-process"
QUEUE = "default"  # the pool's own queue; a host can take its own (`vflow stack worker --queue`)
MLFLOW_MARKER = "mlflow"
PREFECT_MARKER = "prefect_compat"
WORKER_MARKER = "worker"


def mlflow_command(host: str, port: int) -> list[str]:
    """(MLflow's own Host-header check admits loopback and private addresses; a public
    name needs MLFLOW_SERVER_ALLOWED_HOSTS.)"""
    return [sys.executable, "-m", "mlflow", "server",
            "--artifacts-destination", "s3://mlflow/artifacts", "--serve-artifacts",
            "--host", host, "--port", str(port), "--workers", "1"]


def mlflow_env(backend_uri: str, s3_endpoint: str, access_key: str,
               secret_key: str) -> dict[str, str]:
    """Secrets go through the environment, not the command line (`ps` shows that). The
    tracking server alone holds the S3 keys: clients upload through it."""
    return {**MLFLOW_SERVER, "MLFLOW_BACKEND_STORE_URI": backend_uri,
            "AWS_ACCESS_KEY_ID": access_key,
            "AWS_SECRET_ACCESS_KEY": secret_key, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
            # a store that is down answers in seconds, not after boto's long back-off
            "AWS_RETRY_MODE": "standard", "AWS_MAX_ATTEMPTS": "3"}


def prefect_command(host: str, port: int, ui: bool) -> list[str]:
    # `prefect server start` with the SQLAlchemy 2.1 fix (see orchestration/prefect_compat.py)
    return [sys.executable, "-m", "visionflow.orchestration.prefect_compat", "server", "start",
            "--host", host, "--port", str(port), "--analytics-off",
            *([] if ui else ["--no-ui"])]


def prefect_env(db_url: str, home: Path, api_url: str = "") -> dict[str, str]:
    """`api_url`: where the UI's browser code reaches the API (the UI's default is port 4200,
    not the port the server was started on)."""
    ui = {"PREFECT_UI_API_URL": api_url} if api_url else {}
    return {**ui, "PREFECT_HOME": str(home), "PREFECT_SERVER_DATABASE_CONNECTION_URL": db_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_DATABASE_TIMEOUT": "30",
            "PREFECT_SERVER_DATABASE_CONNECTION_TIMEOUT": "10"}


def prefect_cli(*args: str, env: Mapping[str, str], cwd: Path,
                timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).parent / "prefect"), "--no-prompt", *args]
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=dict(env), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise StackError(f"prefect {' '.join(args)}: no answer within {timeout:.0f} s") from None
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
        raise StackError(f"prefect {' '.join(args)} failed: "
                         f"{lines[-1].strip() if lines else proc.returncode}")
    return proc


def create_pool(env: Mapping[str, str], cwd: Path) -> None:
    prefect_cli("work-pool", "create", POOL, "--type", "process", "--overwrite", env=env,
                cwd=cwd)


def deploy(env: Mapping[str, str], cwd: Path) -> str:
    """`prefect deploy --all` from the checkout: every deployment of prefect.yaml."""
    if not (cwd / "prefect.yaml").is_file():
        raise StackError(f"{cwd / 'prefect.yaml'}: not found (no deployments to create)")
    proc = prefect_cli("deploy", "--all", env=env, cwd=cwd)
    return proc.stdout


def worker_command(name: str, limit: int = 1, queue: str | None = None) -> list[str]:
    return [str(Path(sys.executable).parent / "prefect"), "--no-prompt", "worker", "start",
            "--pool", POOL, "--type", "process", "--name", name, "--limit", str(limit),
            "--install-policy", "never", *(["--work-queue", queue] if queue else [])]


def workers_online(api_url: str, timeout: float = 5) -> set[str]:
    """Names of the workers of the pool that have sent a heartbeat."""
    req = urllib.request.Request(f"{api_url}/work_pools/{POOL}/workers/filter", data=b"{}",
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (our server)
            rows = json.loads(resp.read())
    except (OSError, ValueError, urllib.error.URLError):
        return set()
    return {r["name"] for r in rows if r.get("status", "ONLINE") == "ONLINE"}
