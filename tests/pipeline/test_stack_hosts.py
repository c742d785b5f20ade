"""Two hosts on the team stack: two network namespaces joined by a veth pair, each with its
own checkout and its own Prefect worker.

Host A (10.213.13.1) serves the stack on its address: the session's servers are relayed to
it through Unix sockets (`netrelay.py`: the namespaces share the file system, not the
network), so host B reaches them over the veth pair, as it would reach a server host. The
torchrun rendezvous and gloo traffic between the two go over the veth pair too. Only the
project's two namespaces and loopback carry traffic; everything is removed at the end.

- Both workers register at the same moment (the test holds the registry lock until both
  registrations wait on it): exactly one champion, `previous` consistent, no lost version,
  and the second registration was judged against the first one's result.
- `torchrun --nnodes=2` across the two namespaces trains one model (rank 0 on host A).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from helpers import BIN
from stack_fixtures import (
    MODEL,
    TeamStack,
    assert_consistent,
    registry_state,
    wait_for,
)

pytestmark = [pytest.mark.stack, pytest.mark.slow]

RELAY = Path(__file__).parents[1] / "netrelay.py"  # (a helper, not a test)
NET = "10.213.13"
ADDR = {"a": f"{NET}.1", "b": f"{NET}.2"}


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def require_netns() -> None:
    why = None
    if os.geteuid() != 0:
        why = "network namespaces need root"
    elif shutil.which("ip") is None:
        why = "iproute2 (`ip`) is not installed"
    if why is None:
        return
    if os.environ.get("VFLOW_REQUIRE_STACK") == "1":
        pytest.fail(f"two-host test required (VFLOW_REQUIRE_STACK=1) but: {why}")
    pytest.skip(why)


@dataclass
class Hosts:
    ts: TeamStack
    ns: dict[str, str]
    veth: dict[str, str]
    roots: dict[str, Path]
    procs: list[subprocess.Popen] = field(default_factory=list)

    def env(self, host: str, **extra: str) -> dict[str, str]:
        """A process on `host`: the stack's URLs at host A's address, its own checkout."""
        env = dict(os.environ)
        for key, value in self.ts.stack.client_env().items():
            env[key] = value.replace("127.0.0.1", ADDR["a"])
        env.update(VFLOW_CHECKOUT=str(self.roots[host]), GLOO_SOCKET_IFNAME=self.veth[host],
                   **extra)
        return env

    def spawn(self, host: str, cmd: list[str], log: Path, **extra: str) -> subprocess.Popen:
        out = open(log, "ab")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns[host], *cmd],
                                env=self.env(host, **extra), stdout=out,
                                stderr=subprocess.STDOUT, cwd=self.roots[host],
                                start_new_session=True)
        out.close()
        self.procs.append(proc)
        return proc


def _stop(proc: subprocess.Popen, grace: float = 3) -> None:
    if proc.poll() is None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(grace)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue


def _teardown(hosts: Hosts | None, names: dict[str, str]) -> None:
    """Idempotent: every process we started, every process left in our namespaces, the
    namespaces (their veth pair goes with them)."""
    procs = [p for p in (hosts.procs if hosts else []) if p.poll() is None]
    for proc in procs:  # test processes with nothing to save: no graceful shutdown
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    for proc in procs:
        _stop(proc)
    for ns in names.values():
        pids = _ip("netns", "pids", ns, check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        _ip("netns", "del", ns, check=False)


def _checkout(src: Path, dst: Path, min_delta: float) -> Path:
    """Host's own copy of the team's checkout: data, outputs, DVC cache and dvc.lock, so
    every stage is up to date but register, whose params differ (`register.min_delta`)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".cache", "mlruns"))
    (dst / "mlruns").mkdir()
    params = yaml.safe_load((dst / "params.yaml").read_text())
    params["register"]["min_delta"] = min_delta
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dst


@pytest.fixture(scope="module")
def hosts(team_stack: TeamStack, flow_run) -> Hosts:
    require_netns()
    tag = uuid.uuid4().hex[:6]
    names = {"a": f"vflow-a-{tag}", "b": f"vflow-b-{tag}"}
    veth = {"a": f"vfa{tag}", "b": f"vfb{tag}"}
    base = Path(tempfile.mkdtemp(prefix="vfh"))  # short: Unix socket paths are short
    hosts: Hosts | None = None
    try:
        for h in "ab":
            _ip("netns", "add", names[h])
        _ip("link", "add", veth["a"], "type", "veth", "peer", "name", veth["b"])
        for h in "ab":
            _ip("link", "set", veth[h], "netns", names[h])
            _ip("-n", names[h], "addr", "add", f"{ADDR[h]}/30", "dev", veth[h])
            _ip("-n", names[h], "link", "set", veth[h], "up")
            _ip("-n", names[h], "link", "set", "lo", "up")
        roots = {h: _checkout(team_stack.root, base / f"host-{h}", min_delta=d)
                 for h, d in (("a", 0.001), ("b", 0.002))}
        hosts = Hosts(team_stack, names, veth, roots)
        st = team_stack.stack
        ports = [str(st.port(s)) for s in ("postgres", "s3", "mlflow", "prefect")]
        socks = base / "s"
        socks.mkdir()
        relay_out = base / "relay.log"
        with open(relay_out, "ab") as out:
            hosts.procs.append(subprocess.Popen(
                [sys.executable, str(RELAY), "unix", str(socks), *ports],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
        wait_for(lambda: all((socks / f"{p}.sock").exists() for p in ports), 30, "relay")
        hosts.spawn("a", [sys.executable, str(RELAY), "tcp", ADDR["a"],
                          str(socks), *ports], relay_out)
        api = f"http://{ADDR['a']}:{st.port('prefect')}/api/health"
        probe = [sys.executable, "-c", f"import urllib.request as u; u.urlopen('{api}', "
                 "timeout=3)"]
        wait_for(lambda: subprocess.run(["ip", "netns", "exec", names["b"], *probe],
                                        capture_output=True).returncode == 0,
                 60, "host B reaching the Prefect server on host A")
        with team_stack.prefect() as c:
            from visionflow.stack.services import POOL

            for h in "ab":
                c.create_work_queue(name=f"host-{h}", work_pool_name=POOL)
        for h in "ab":
            hosts.spawn(h, [str(BIN / "vflow"), "stack", "worker", "--root", str(roots[h]),
                            "--name", f"host-{h}", "--queue", f"host-{h}"],
                        base / f"worker-{h}.log")
        from visionflow.stack.services import workers_online

        wait_for(lambda: {"host-a", "host-b"} <= workers_online(st.url("prefect") + "/api"),
                 120, "both hosts' workers")
        yield hosts
    finally:
        t0 = time.monotonic()
        _teardown(hosts, names)
        shutil.rmtree(base, ignore_errors=True)
        print(f"hosts torn down in {time.monotonic() - t0:.1f} s")
        assert not any(n in _ip("netns", "list").stdout for n in names.values())


def _weak_champion(ts: TeamStack, tmp: Path, monkeypatch) -> str:
    """Register an untrained copy of the model and promote it by hand, so that the trained
    model the hosts register beats it."""
    import torch

    from visionflow.core.configfile import load_params
    from visionflow.core.layout import Layout
    from visionflow.mlops import registry
    from visionflow.model.classifier import build_classifier, load_classifier, save_classifier
    from visionflow.orchestration.stage_runner import run_stage

    src = Layout.at(ts.root)
    dst = tmp / "weak"
    shutil.copytree(src.root, dst, ignore=shutil.ignore_patterns(".cache", "mlruns"))
    layout = Layout.at(dst)
    _, arch = load_classifier(layout.model)
    torch.manual_seed(0)
    save_classifier(layout.model, build_classifier(arch), arch)
    layout.run_info.unlink(missing_ok=True)
    for key, value in ts.stack.client_env().items():
        monkeypatch.setenv(key, value)
    reg = run_stage("register", load_params(layout.params, ["register.compact=false"]), layout)
    registry.promote(ts.client(), MODEL, reg.version, reason="test: a weak champion")
    return reg.version


def _lock_waiters(ts: TeamStack) -> int:
    from visionflow.mlops.registry_lock import ADVISORY_KEY

    rows = ts.admin_sql("mlflow", "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                        "AND classid = %s AND objid = %s AND NOT granted", ADVISORY_KEY)
    return int(rows[0][0])


def test_two_hosts_register_at_once_one_champion(hosts: Hosts, flow_run, tmp_path,
                                                 monkeypatch):
    import psycopg

    from visionflow.mlops.registry_lock import ADVISORY_KEY

    ts = hosts.ts
    weak = _weak_champion(ts, tmp_path, monkeypatch)
    lock = psycopg.connect(ts.stack.client_env()["VFLOW_REGISTRY_LOCK_URL"], autocommit=True)
    try:
        lock.execute("SELECT pg_advisory_lock(%s, %s)", ADVISORY_KEY)
        runs = {h: ts.run_deployment("retrain/team", {}, queue=f"host-{h}") for h in "ab"}

        def both_waiting() -> bool:
            with ts.prefect() as c:
                for fr in runs.values():
                    state = c.read_flow_run(fr.id).state
                    assert not state.is_final(), (state.message, ts.logs(fr.id)[-2000:])
            return _lock_waiters(ts) == 2

        wait_for(both_waiting, 600, "both hosts' registrations waiting on the lock", every=1)
    finally:
        lock.close()  # both race for the lock now
    finals = {h: ts.wait_final(fr.id, timeout=300) for h, fr in runs.items()}
    for h, fr in finals.items():
        assert fr.state.is_completed(), (h, fr.state.message, ts.logs(fr.id)[-3000:])

    regs = {h: json.loads((hosts.roots[h] / "outputs" / "register" /
                           "registration.json").read_text()) for h in "ab"}
    va, vb = regs["a"]["version"], regs["b"]["version"]
    assert va != vb
    client = ts.client()
    state = registry_state(client)
    assert {va, vb} <= set(state["versions"]), "a registration was lost"
    assert_consistent(state)
    judged = {h: client.get_model_version(MODEL, regs[h]["version"]).tags
              for h in "ab"}
    first, second = sorted("ab", key=lambda h: int(regs[h]["version"]))
    # the first beat the weak champion; the second was judged against the first's result
    assert judged[first]["gate_champion_version"] == weak
    assert state["versions"][regs[first]["version"]] == "promoted"
    assert judged[second]["gate_champion_version"] == regs[first]["version"]
    expected = regs[second]["version"] if state["versions"][regs[second]["version"]] == \
        "promoted" else regs[first]["version"]
    assert state["aliases"]["champion"] == expected


def test_torchrun_two_nodes_across_namespaces(hosts: Hosts):
    ts = hosts.ts
    model = {h: hosts.roots[h] / "outputs" / "train" / "model.pt" for h in "ab"}
    before = {h: model[h].stat().st_mtime_ns for h in "ab"}
    endpoint = f"{ADDR['a']}:29511"
    t0 = time.time()
    procs = {}
    for h in "ab":
        cmd = [str(BIN / "vflow"), "launch", "--root", str(hosts.roots[h]),
               "--local-addr", ADDR[h], "-s", "seed=0", "-s", "train.nodes=2",
               "-s", "train.procs_per_node=1", "-s", f"train.rdzv_endpoint={endpoint}",
               "-s", "train.rdzv_id=two-hosts", "-s", "train.epochs=1",
               "-s", "train.progress=false"]
        procs[h] = hosts.spawn(h, cmd, hosts.roots[h] / "launch.log")
    for h, proc in procs.items():
        try:
            proc.wait(timeout=420)
        except subprocess.TimeoutExpired:
            pytest.fail(f"host {h}: torchrun did not finish: "
                        f"{(hosts.roots[h] / 'launch.log').read_text()[-3000:]}")
    for h, proc in procs.items():
        assert proc.returncode == 0, (h, (hosts.roots[h] / "launch.log").read_text()[-4000:])
    # rank 0's own line, then the launch's (its wall time), on the host that holds rank 0
    done = [ln.split(" done: ")[0] for ln in (hosts.roots["a"] / "launch.log").read_text()
            .splitlines() if " done: " in ln]
    assert done == ["train", "launch"], done
    # one set of outputs: rank 0 on host A (its address sorts first) wrote them; B did not
    assert model["a"].stat().st_mtime_ns != before["a"]
    assert model["b"].stat().st_mtime_ns == before["b"]
    from visionflow.model.classifier import load_classifier

    _, arch = load_classifier(model["a"])
    assert arch.num_classes == 10
    history = (hosts.roots["a"] / "outputs" / "train" / "history.csv").read_text().splitlines()
    assert len(history) == 2  # header + one epoch
    run_id = json.loads((hosts.roots["a"] / "outputs" / "train" / "run.json").read_text())[
        "run_id"]
    client = ts.client()
    run = client.get_run(run_id)
    assert run.data.tags["world_size"] == "2"
    exp = run.info.experiment_id
    new = [r for r in client.search_runs([exp], max_results=50)
           if r.info.start_time >= t0 * 1000 - 1000]
    assert [r.info.run_id for r in new] == [run_id], "only rank 0 logs to MLflow"
