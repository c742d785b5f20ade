"""The team stack against one machine's files, side by side, and training on two nodes.

flow:  the `retrain` flow (force=True: every stage runs) on two scratch copies of the project,
       interleaved, each sample a fresh process:
       - local: MLflow on the project's sqlite store, Prefect on a `vflow server` (sqlite);
       - stack: `vflow stack` (MLflow server on PostgreSQL with S3 artifacts, Prefect server
         on PostgreSQL, the PostgreSQL registry lock).
       Per sample: flow wall time, the stage functions' time inside it, the register stage's
       time, the API's first answer. Flow overhead = flow wall - in-run stage time.
train: the train stage on the digits at 16 px (the `fast` net) on this machine's 2 cores:
       - 1x1: 1 node x 1 process, 1 thread, in place;
       - 1x1-2t: the same with 2 threads (on 2 busy cores, often slower than 1);
       - 1x2: 1 node x 2 processes (1 thread each), torchrun --standalone, gloo;
       - 2x1: 2 nodes x 1 process (1 thread each): two network namespaces joined by a veth
         pair, torchrun with a c10d rendezvous across them, gloo over the veth (root, ip).
       Throughput: training images per second over the epochs after the first (history.csv),
       all ranks together.

    .venv/bin/python bench/bench_stack.py flow --repeats 3
    .venv/bin/python bench/bench_stack.py train --repeats 3 --epochs 4
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FLOW_SETS = ["train.epochs=1", "data.limit_per_class=30", "compress.methods=[prune]",
             "train.threads=1"]


def _project(root: Path, overrides: list[str]) -> Path:
    import yaml

    from visionflow.core.configfile import apply_overrides, read_params_file
    from visionflow.data.digits import materialize_digits

    root.mkdir(parents=True)
    for name in ("dvc.yaml", "flows"):
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, root / name)
    materialize_digits(root / "data")
    raw = apply_overrides(read_params_file(REPO / "params.yaml"), overrides)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (root / "mlruns").mkdir()
    return root


# ------------------------------------------------------------------------------- flow


def flow_worker(root: Path) -> dict:
    """One flow sample in this fresh process; returns one JSON-able dict."""
    from prefect.client.orchestration import get_client
    from prefect.utilities.importtools import load_script_as_module

    flow_mod = load_script_as_module(str(root / "flows" / "retrain.py"))
    t = time.perf_counter()
    with get_client(sync_client=True) as client:
        client.api_healthcheck()
    api = time.perf_counter() - t
    t0 = time.perf_counter()
    out = flow_mod.retrain(root=str(root), force=True)
    wall = time.perf_counter() - t0
    sec = out["stage_seconds"]
    return {"run_wall": wall, "stage_sum": sum(sec.values()), "register": sec["register"],
            "train": sec["train"], "api": api, "overhead": wall - sum(sec.values()),
            "version": out["version"]}


def _sample(root: Path, env: dict) -> dict:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--flow-worker", str(root)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"sample failed in {root}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith('{"run_wall"')][-1]
    return {**json.loads(line), "process": time.perf_counter() - t}


def bench_flow(repeats: int, overrides: list[str]) -> dict:
    from visionflow.core.layout import Layout
    from visionflow.orchestration import servers
    from visionflow.stack.core import Options, Stack

    base = Path(tempfile.mkdtemp(prefix="bench-stack-"))
    base.chmod(0o755)  # PostgreSQL's own user must reach the stack's data
    env = {**os.environ, "PREFECT_HOME": str(base / "prefect"), "DO_NOT_TRACK": "true",
           "PREFECT_LOGGING_LEVEL": "WARNING", "MLFLOW_DISABLE_TELEMETRY": "true",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "VFLOW_REGISTRY_LOCK_URL"):
        env.pop(key, None)
    os.environ.update(env)
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        os.environ.pop(key, None)
    roots = {m: _project(base / m, overrides) for m in ("local", "stack")}
    stack = Stack(Layout.at(base / "stack-host"))
    local_server = Layout.at(base / "local-server")
    samples: dict[str, list[dict]] = {"local": [], "stack": []}
    try:
        t = time.perf_counter()
        st = servers.start(servers.PREFECT, local_server, port=0, ui=False, timeout=300)
        print(f"local Prefect server (sqlite) up in {time.perf_counter() - t:.1f} s", flush=True)
        t = time.perf_counter()
        stack.up(Options(workers=0, ui=False, deploy=False), log=lambda *_: None)
        print(f"stack up in {time.perf_counter() - t:.1f} s", flush=True)
        envs = {"local": {**env, "PREFECT_API_URL": st.api_url},
                "stack": {**env, **stack.client_env()}}
        for mode in ("local", "stack"):  # warm-up: first-time costs, not counted
            _sample(roots[mode], envs[mode])
        for i in range(repeats):
            for mode in ("local", "stack"):
                s = _sample(roots[mode], envs[mode])
                samples[mode].append(s)
                print(f"[{i + 1}/{repeats}] {mode:5s} flow {s['run_wall']:6.2f} s  stages "
                      f"{s['stage_sum']:6.2f} s  overhead {s['overhead']:5.2f} s  register "
                      f"{s['register']:5.2f} s  api {s['api']:4.2f} s", flush=True)
    finally:
        servers.stop(servers.PREFECT, local_server)
        stack.down(log=lambda *_: None)
        shutil.rmtree(base, ignore_errors=True)
    keys = ("run_wall", "stage_sum", "overhead", "register", "train", "api", "process")
    med = {m: {k: statistics.median(s[k] for s in v) for k in keys} for m, v in samples.items()}
    print(f"\nmedians of {repeats} (seconds)      local    stack")
    for k in keys:
        print(f"  {k:24s} {med['local'][k]:8.2f} {med['stack'][k]:8.2f}")
    return {"samples": samples, "medians": med}


# ------------------------------------------------------------------------------- train


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@contextlib.contextmanager
def _two_namespaces():
    tag = uuid.uuid4().hex[:6]
    ns = {"a": f"vfb-a-{tag}", "b": f"vfb-b-{tag}"}
    veth = {"a": f"vba{tag}", "b": f"vbb{tag}"}
    addr = {"a": "10.213.14.1", "b": "10.213.14.2"}
    try:
        for h in "ab":
            _ip("netns", "add", ns[h])
        _ip("link", "add", veth["a"], "type", "veth", "peer", "name", veth["b"])
        for h in "ab":
            _ip("link", "set", veth[h], "netns", ns[h])
            _ip("-n", ns[h], "addr", "add", f"{addr[h]}/30", "dev", veth[h])
            _ip("-n", ns[h], "link", "set", veth[h], "up")
            _ip("-n", ns[h], "link", "set", "lo", "up")
        yield ns, veth, addr
    finally:
        for h in "ab":
            for pid in subprocess.run(["ip", "netns", "pids", ns[h]], capture_output=True,
                                      text=True).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)
            subprocess.run(["ip", "netns", "del", ns[h]], capture_output=True)


def _throughput(root: Path) -> tuple[float, float]:
    with (root / "outputs" / "train" / "history.csv").open() as f:
        rows = list(csv.DictReader(f))
    later = rows[1:] or rows
    return (statistics.median(float(r["img_per_s"]) for r in later),
            sum(float(r["seconds"]) for r in rows))


def _run(cmd: list[str], cwd: Path, env: dict, ns: str | None = None) -> subprocess.Popen:
    pre = ["ip", "netns", "exec", ns] if ns else []
    return subprocess.Popen([*pre, *cmd], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait(procs: list[subprocess.Popen], what: str) -> None:
    for p in procs:
        out, _ = p.communicate(timeout=1800)
        if p.returncode != 0:
            raise SystemExit(f"{what} failed:\n{out[-3000:]}")


def bench_train(repeats: int, epochs: int) -> dict:
    from visionflow.core.configfile import load_params
    from visionflow.core.layout import Layout
    from visionflow.orchestration.stage_runner import run_stage

    base = Path(tempfile.mkdtemp(prefix="bench-train-"))
    sets = [f"train.epochs={epochs}", "train.progress=false", "train.calibrate=false"]
    src = _project(base / "prepared", sets)
    layout = Layout.at(src)
    params = load_params(layout.params, root=layout.root)
    for name in ("validate", "pack"):
        run_stage(name, params, layout)
    env = {**os.environ, "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    vflow = str(BIN / "vflow")
    samples: dict[str, list[tuple[float, float]]] = {}
    netns = os.geteuid() == 0 and shutil.which("ip") is not None
    try:
        with contextlib.ExitStack() as stack:
            ns = stack.enter_context(_two_namespaces()) if netns else None
            for i in range(repeats):
                variants = ["1x1", "1x1-2t", "1x2", *(["2x1"] if ns else [])]
                for v in variants:
                    roots = [base / f"{v}-{i}-{h}" for h in ("a", "b")[:2 if v == "2x1" else 1]]
                    for r in roots:
                        shutil.copytree(src, r, ignore=shutil.ignore_patterns("mlruns"))
                        (r / "mlruns").mkdir()
                    if v.startswith("1x1"):
                        threads = 2 if v.endswith("2t") else 1
                        procs = [_run([vflow, "stage", "train", "--root", str(roots[0]),
                                       "-s", f"train.threads={threads}"], roots[0], env)]
                    elif v == "1x2":
                        procs = [_run([vflow, "launch", "--root", str(roots[0]), "-s",
                                       "train.procs_per_node=2", "-s", "train.threads=1"],
                                      roots[0], env)]
                    else:
                        names, veth, addr = ns
                        endpoint = f"{addr['a']}:29611"
                        procs = [_run([vflow, "launch", "--root", str(r), "--local-addr",
                                       addr[h], "-s", "train.nodes=2", "-s",
                                       f"train.rdzv_endpoint={endpoint}", "-s",
                                       f"train.rdzv_id=bench-{i}", "-s", "train.threads=1"],
                                      r, {**env, "GLOO_SOCKET_IFNAME": veth[h]}, names[h])
                                 for h, r in zip("ab", roots, strict=True)]
                    _wait(procs, v)
                    samples.setdefault(v, []).append(_throughput(roots[0]))
                    ips, secs = samples[v][-1]
                    print(f"[{i + 1}/{repeats}] {v}: {ips:7.0f} img/s, {secs:6.1f} s training",
                          flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    med = {v: {"img_per_s": statistics.median(s[0] for s in ss),
               "train_seconds": statistics.median(s[1] for s in ss)} for v, ss in samples.items()}
    print(f"\nmedians of {repeats}: nodes x processes, images/s (epochs 2+), training seconds")
    for v, m in med.items():
        print(f"  {v}: {m['img_per_s']:7.0f} img/s  {m['train_seconds']:6.1f} s")
    return {"samples": samples, "medians": med}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", nargs="?", choices=["flow", "train"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("-s", "--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default=None, help="write samples and medians as JSON")
    ap.add_argument("--flow-worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.flow_worker:
        print(json.dumps(flow_worker(Path(a.flow_worker))))
        return
    if a.what == "flow":
        result = bench_flow(a.repeats, [*FLOW_SETS, *a.overrides])
    elif a.what == "train":
        result = bench_train(a.repeats, a.epochs)
    else:
        ap.error("say what to measure: flow or train")
    if a.out:
        Path(a.out).write_text(json.dumps({"args": vars(a), **result}, indent=1, default=str))


if __name__ == "__main__":
    main()
