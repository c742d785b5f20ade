"""The team stack for the `stack` tests, started once per test session (no tests here).

`team_stack`: PostgreSQL, the S3 server, the MLflow tracking server, the Prefect server, the
work pool with the deployments of prefect.yaml and one worker, for a checkout made from this
repository (git + DVC, the digits data); booted in the background from the end of
collection (under pytest-xdist, where every worker collects every test, by the worker that runs
the `stack` group, at its first stack test), stopped at the end of the session whatever
happened. `flow_run`: the one full
`retrain` run the other tests build on. Without PostgreSQL the stack tests skip, unless
VFLOW_REQUIRE_STACK=1 (`make test` as root: CI), where they fail.
"""

from __future__ import annotations

import functools
import os
import shutil
import ssl
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from builders import wait_for
from helpers import BIN, REPO, make_project, run

# 30 digits per class and split, a few small batches, one quick compression (int8, so a
# promoted version gets its `compact` copy); training on two processes (torchrun, gloo), so
# the flow launches it
TEAM = {"train.epochs": 3, "train.batch_size": 16, "train.threads": 1,
        "train.procs_per_node": 2, "data.limit_per_class": 30, "compress.methods": ["int8"],
        "compress.combine": False, "compress.calibration_images": 64,
        "compress.latency_reps": 3, "compress.latency_reps_large": 1,
        "compress.max_top1_drop": 5.0, "flow.retry_delay_s": 2, "flow.retry_jitter": 0}
MODEL = "visionflow-classifier"
# clients in tests give up on a dead server after seconds (MLflow's default is minutes)
CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
              "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
              "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
              "PREFECT_WORKER_QUERY_SECONDS": "1",
              "PREFECT_WORKER_PREFETCH_SECONDS": "1",
              "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def stack_unavailable() -> str | None:
    from visionflow.stack import objectstore, postgres
    from visionflow.stack.procs import StackError

    try:
        postgres.pg_bin("initdb")
        postgres.run_as()
        objectstore.rclone()
        import boto3  # noqa: F401
        import psycopg  # noqa: F401
    except (StackError, ImportError) as err:
        return str(err)
    return None


def require_stack() -> None:
    why = stack_unavailable()
    if why is None:
        return
    if os.environ.get("VFLOW_REQUIRE_STACK") == "1":
        pytest.fail(f"team stack required (VFLOW_REQUIRE_STACK=1) but: {why}")
    pytest.skip(f"team stack unavailable: {why}")


def reachable_tmpdir(prefix: str) -> Path:
    """A temp folder PostgreSQL's unprivileged user can traverse (pytest's are 0700)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


def make_checkout(root: Path, digits_dir: Path, overrides: dict) -> Path:
    """A git + DVC checkout of the project with prefect.yaml, committed."""
    make_project(root, digits_dir, overrides, git=True)
    shutil.copy(REPO / "prefect.yaml", root / "prefect.yaml")
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-q", "-m", "prefect.yaml"], root)
    return root


@functools.cache
def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()


@dataclass
class TeamStack:
    stack: Any  # visionflow.stack.core.Stack
    root: Path

    @property
    def env(self) -> dict[str, str]:
        """A client's environment: this process's plus the stack's URLs and keys."""
        return {**os.environ, **self.stack.client_env()}

    def admin_sql(self, db: str, query: str, args: tuple = ()) -> list[tuple]:
        import psycopg

        from visionflow.stack import postgres

        c = self.stack.credentials()
        with psycopg.connect(self.stack.cluster().url(postgres.ADMIN, c.admin, db),
                             autocommit=True, connect_timeout=10) as conn:
            cur = conn.execute(query, args)
            return cur.fetchall() if cur.description else []

    def s3_keys(self, bucket: str, prefix: str = "") -> list[str]:
        from visionflow.stack import objectstore

        c = self.stack.credentials()
        return objectstore.list_objects(self.stack.url("s3"), c.s3_access_key,
                                        c.s3_secret_key, bucket, prefix)

    def client(self):
        """MlflowClient on the tracking server."""
        from mlflow import MlflowClient

        uri = self.stack.url("mlflow")
        return MlflowClient(tracking_uri=uri, registry_uri=uri)

    def prefect(self):
        """A synchronous Prefect client on the stack's API (use as a context manager). The
        tests poll through a new client every 0.3 s: one TLS context for all of them, where
        each client would load the CA bundle again (45 ms a client here; 28.6 s of a
        suite's py-spy samples, BENCHMARKS "Session 14")."""
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.stack.url("prefect") + "/api",
                                 httpx_settings={"verify": _tls_context()})

    def run_deployment(self, name: str = "retrain/team", parameters: dict | None = None,
                       queue: str | None = None) -> Any:
        with self.prefect() as c:
            dep = c.read_deployment_by_name(name)
            return c.create_flow_run_from_deployment(dep.id, parameters=parameters or {},
                                                     work_queue_name=queue)

    def wait_final(self, flow_run_id, timeout: float = 600) -> Any:
        with self.prefect() as c:
            return wait_for(lambda: (fr := c.read_flow_run(flow_run_id)).state.is_final()
                            and fr, timeout, f"flow run {flow_run_id}", every=1.0)

    def task_runs(self, flow_run_id) -> dict[str, Any]:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        with self.prefect() as c:
            runs = c.read_task_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[flow_run_id])))
        return {r.name: r for r in runs}

    def logs(self, flow_run_id) -> str:
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

        with self.prefect() as c:
            return "\n".join(r.message for r in c.read_logs(log_filter=LogFilter(
                flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))))


def registry_state(client, name: str = MODEL) -> dict[str, Any]:
    """Versions (with their gate decision; `compact` copies, which the gate does not judge,
    left out), aliases and the alias history."""
    from visionflow.mlops import registry

    try:
        versions = {v.version: v.tags.get("gate_decision", "")
                    for v in registry.list_versions(client, name)
                    if "parent_version" not in v.tags}
        aliases = registry.alias_map(client, name)
    except registry.RegistryError:
        return {"versions": {}, "aliases": {}, "history": []}
    return {"versions": versions, "aliases": aliases, "history": registry.history(client, name)}


def assert_consistent(state: dict[str, Any]) -> None:
    """One champion; the history is one chain (each move starts where the last ended);
    `previous` is where the last move came from; every promoted version was champion once,
    and no alias points at a version that was not promoted."""
    history = [h for h in state["history"] if h["alias"] == "champion"]
    aliases = state["aliases"]
    assert history, state
    for a, b in zip(history, history[1:], strict=False):
        assert b["from"] == a["to"], f"history forks: {a} then {b}"
    assert aliases["champion"] == history[-1]["to"], state
    if history[-1]["from"]:
        assert aliases.get("previous") == history[-1]["from"], state
    promoted = {v for v, d in state["versions"].items() if d == "promoted"}
    assert promoted == {h["to"] for h in history if h["action"] == "gate"}, state
    assert state["versions"][aliases["champion"]] == "promoted", state


# ------------------------------------------------------------------------------ the session
#
# The stack boots in a thread as soon as collection has chosen at least one `stack` test, so
# that its start-up (initdb, migrations of two servers: tens of seconds on two busy cores)
# overlaps the tests that run before them. `pytest_sessionfinish` stops it whatever happened.

_BOOT: dict[str, Any] = {}


def _boot(env: dict[str, str]) -> None:
    from visionflow.core.layout import Layout
    from visionflow.data.digits import materialize_digits
    from visionflow.stack.core import Options, Stack

    try:
        t0 = time.perf_counter()
        base = reachable_tmpdir("vflow-stack-")
        _BOOT["base"] = base
        digits = materialize_digits(base / "digits")
        root = make_checkout(base / "team", digits, TEAM)
        stack = Stack(Layout.at(root), base_env=env)
        _BOOT["stack"] = stack
        # the Prefect UI too: the browser test opens its flow-run pages
        stack.up(Options(workers=1, ui=True, timeout=300), log=lambda *_: None)
        _BOOT["seconds"] = time.perf_counter() - t0
    except BaseException as err:  # noqa: BLE001 (reported by the fixture)
        _BOOT["error"] = err


def _start_boot() -> None:
    if "thread" in _BOOT or stack_unavailable() is not None:
        return
    env = {**os.environ, **CLIENT_ENV}  # a snapshot: later tests' env changes do not leak
    _BOOT["thread"] = threading.Thread(target=_boot, args=(env,), name="team-stack-boot",
                                       daemon=True)
    _BOOT["thread"].start()


def pytest_collection_finish(session) -> None:
    # under xdist every worker collects every test: the worker that runs the `stack` group
    # boots the stack when its first stack test asks for it (`team_stack`)
    if hasattr(session.config, "workerinput") or session.config.option.collectonly:
        return  # (`--collect-only` runs nothing: no stack either)
    if any(item.get_closest_marker("stack") for item in session.items):
        _start_boot()


def pytest_sessionfinish(session, exitstatus) -> None:
    thread = _BOOT.get("thread")
    if thread is not None:
        thread.join(600)
    stack = _BOOT.pop("stack", None)
    if stack is not None:
        stack.down(log=lambda *_: None, grace=3, purge=True)
        left = [s.name for s in stack.status() if s.running]
        if left:
            print(f"\nteam stack: still running after down: {left}")
    if "base" in _BOOT:
        shutil.rmtree(_BOOT.pop("base"), ignore_errors=True)


@pytest.fixture(scope="session")
def team_stack() -> TeamStack:
    require_stack()
    _start_boot()
    _BOOT["thread"].join(900)
    if "error" in _BOOT:
        raise _BOOT["error"]
    if "stack" not in _BOOT:
        pytest.fail("the team stack did not come up within 900 s")
    os.environ.update(CLIENT_ENV)
    print(f"\nteam stack up {_BOOT.get('seconds', 0):.1f} s after collection")
    return TeamStack(_BOOT["stack"], _BOOT["stack"].layout.root)


@pytest.fixture(scope="session")
def flow_run(team_stack: TeamStack) -> dict[str, Any]:
    """One run of the `retrain/team` deployment, taken by the stack's worker, with two
    faults and one launch on the way: train runs as two gloo processes through torchrun
    (params.yaml asks for them), and PostgreSQL restarts between train and evaluate while
    this process holds the registry lock (which must then report itself lost)."""
    from visionflow.mlops import registry_lock

    ts = team_stack
    fr = ts.run_deployment("retrain/team", {"force": True})
    wait_task(ts, fr.id, "train", {"Completed"}, timeout=900)
    lost = None
    with registry_lock.advisory_lock(ts.stack.client_env()[registry_lock.LOCK_URL_VAR]) as held:
        t0 = time.monotonic()
        ts.stack.restart_postgres()  # every connection of both servers is cut
        restart = time.monotonic() - t0
        try:
            held.check()
        except registry_lock.RegistryLockLost as err:
            lost = str(err)
    final = ts.wait_final(fr.id, timeout=900)
    assert final.state.is_completed(), (final.state.message, ts.logs(fr.id)[-3000:])
    return {"flow_run": final, "lock_lost": lost, "restart_s": restart}


def wait_task(ts: TeamStack, flow_run_id, name: str, states: set[str],
              timeout: float = 600) -> None:
    """Until the task run `name` of the flow run is in one of `states` (fails fast if the
    flow run ends first)."""
    def seen() -> bool:
        task = ts.task_runs(flow_run_id).get(name)
        if task is not None and task.state_name in states:
            return True
        with ts.prefect() as c:
            fr = c.read_flow_run(flow_run_id)
        assert not fr.state.is_final(), (f"flow ended before {name} was {states}: "
                                         f"{fr.state.message}")
        return False

    wait_for(seen, timeout, f"task {name} {states}", every=0.3)


def vflow(*args: str, cwd: Path, env: dict[str, str] | None = None,
          timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "vflow"), *args], cwd=cwd, env=env or dict(os.environ),
                          capture_output=True, text=True, timeout=timeout)
