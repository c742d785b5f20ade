"""The train stage on several processes or machines: `torchrun` launched as params ask.

`train.nodes` x `train.procs_per_node` processes train one model with DDP (gloo on CPU,
NCCL on GPU): data sharded per rank, rank 0 alone logs to MLflow and writes the outputs.
One machine: `torchrun --standalone`. Several: c10d rendezvous at `train.rdzv_endpoint`, and
every node runs the same command (`vflow launch`), the flow on the node that will be rank 0.
Each rank runs the stage module itself (`python3 -m visionflow.stages.train`).

torch's c10d rendezvous ranks the nodes by their address (`--local-addr`, else the host's
name): rank 0, which writes `outputs/train/`, is the node whose address sorts first. The
flow checks that this node got the outputs and says so when rank 0 ran elsewhere. Each node
needs the packed data (`dvc pull outputs/pack/packed.pt`, or a run of `pack`).
"""

from __future__ import annotations

import collections
import contextlib
import csv
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from visionflow.core.config import Params
from visionflow.core.env import on_parent_death
from visionflow.core.errors import VisionflowError
from visionflow.core.files import write_text
from visionflow.core.layout import Layout


class LaunchError(VisionflowError):
    exit_code = 1


def wanted(params: Params) -> bool:
    """More than one training process, and we are not one of them already."""
    cfg = params.train
    return cfg.nodes * cfg.procs_per_node > 1 and "TORCHELASTIC_RUN_ID" not in os.environ


def torchrun_bin() -> str:
    local = Path(sys.executable).with_name("torchrun")
    return str(local) if local.is_file() else "torchrun"


def command(params: Params, params_file: Path, root: Path,
            local_addr: str | None = None) -> list[str]:
    """The torchrun command line for this node (the same on every node)."""
    cfg = params.train
    cmd = [torchrun_bin(), f"--nnodes={cfg.nodes}", f"--nproc-per-node={cfg.procs_per_node}",
           "--max-restarts=0"]
    if cfg.nodes == 1 and cfg.rdzv_endpoint is None:
        cmd.append("--standalone")
    else:
        host, port = str(cfg.rdzv_endpoint).rsplit(":", 1)
        host = host.strip("[]")
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={cfg.rdzv_endpoint}",
                f"--rdzv-id={cfg.rdzv_id}"]
        if not is_local_address(host):
            cmd.append("--rdzv-conf=is_host=false")
        elif is_local_address(host, int(port)):  # (taken: another node here hosts it)
            cmd.append("--rdzv-conf=is_host=true")
    if local_addr:
        cmd.append(f"--local-addr={local_addr}")
    return [*cmd, "-m", "visionflow.stages.train", "--params", str(params_file),
            "--root", str(root)]


def is_local_address(host: str, port: int = 0) -> bool:
    """Whether this machine can bind `host` (and `port`, when given). torch decides which
    node hosts the c10d store by comparing the endpoint with the host name, which misses an
    interface's own address: then no node hosts it and every node waits for one."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    for family, _, _, _, addr in infos:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((addr[0], port))
                return True
            except OSError:
                continue
    return False


def resolved_params(params: Params, layout: Layout) -> Path:
    """The exact params of this run as a file the ranks load (overrides applied)."""
    dump = params.dump()
    digest = hashlib.sha256(json.dumps(dump, sort_keys=True).encode()).hexdigest()[:12]
    path = layout.launch_dir / f"params-{digest}.yaml"
    write_text(path, yaml.safe_dump(dump, sort_keys=False))
    return path


def run(cmd: list[str], cwd: Path, echo: bool = True, keep: int = 120) -> tuple[int, str]:
    """Run torchrun in its own process group, echo its output, return (code, last lines).
    Whatever stops the caller (a task timeout, Ctrl-C, a SIGKILL: torchrun then gets a
    SIGTERM from the kernel, `on_parent_death`) stops every rank too."""
    tail: collections.deque[str] = collections.deque(maxlen=keep)
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, start_new_session=True,
                            preexec_fn=on_parent_death(signal.SIGTERM, os.getpid()))
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip())
            if echo:
                print(line, end="", flush=True)
        return proc.wait(), "\n".join(tail)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


_RANK_PREFIX = re.compile(r"^\[(?:default)?rank\d+\]:\s?")
_RAISED = re.compile(r"^(?:[\w.]*(?:Error|Exception)\b[^:]*: |error: )")


def _error_line(tail: str) -> str:
    """What a rank raised (`[rankN]: SomeError: ...`), else the last line that reads as an
    error: torchrun's own report, which follows, names only exit codes."""
    lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
    raised = [_RANK_PREFIX.sub("", ln) for ln in lines if _RANK_PREFIX.match(ln)]
    raised = [ln for ln in raised if _RAISED.match(ln)]
    keys = ("Error", "error:", "Exception", "Timeout", "failed")
    hits = raised or [ln for ln in lines if any(k in ln for k in keys)]
    return (hits or lines or ["no output"])[-1][:400]


@dataclass
class LaunchResult:
    """What `stages.train.run` returns, read back from the outputs rank 0 wrote (a
    segmenter's last val mIoU in `val_miou`): `seconds` and `images_per_s` of training, as
    the stage counts them; `wall_seconds`, torchrun's whole run, start-up included."""

    model_path: Path
    epochs_run: int
    val_top1: float | None
    seconds: float
    images_per_s: float
    device: str
    val_miou: float | None = None
    wall_seconds: float = 0.0


def train(params: Params, layout: Layout, local_addr: str | None = None,
          need_outputs: bool = True) -> LaunchResult:
    """Run the train stage through torchrun on this node. `need_outputs`: this node must be
    rank 0 (the flow goes on with evaluate here); a joining node (`vflow launch`) need not."""
    cfg = params.train
    cmd = command(params, resolved_params(params, layout), layout.root, local_addr)
    before = layout.model.stat().st_mtime_ns if layout.model.is_file() else None
    where = f" (rendezvous {cfg.rdzv_endpoint}, id {cfg.rdzv_id})" if cfg.rdzv_endpoint else ""
    print(f"train: {cfg.nodes} node(s) x {cfg.procs_per_node} process(es) via torchrun{where}",
          flush=True)
    t0 = time.perf_counter()
    # torchrun's log folder: without --log-dir it leaves a torchelastic_* folder in the temp
    # folder on every launch
    with tempfile.TemporaryDirectory(prefix="vflow-torchrun-") as logs:
        code, tail = run([cmd[0], f"--log-dir={logs}", *cmd[1:]], layout.root)
    seconds = time.perf_counter() - t0
    if code < 0:  # torchrun itself was killed: its ranks went with it
        raise LaunchError(f"torchrun train{where} was killed by {signal.Signals(-code).name}; "
                          "its ranks stopped with it")
    if code != 0:
        raise LaunchError(f"torchrun train{where} exited with code {code}: {_error_line(tail)}")
    here = layout.model.is_file() and layout.model.stat().st_mtime_ns != before
    ranks = f"{cfg.nodes}x{cfg.procs_per_node} ranks"
    if not here and not need_outputs:
        print("train: done; rank 0 ran on another node, which holds the outputs", flush=True)
        return LaunchResult(layout.model, 0, None, 0.0, 0.0, f"{ranks} (not rank 0)",
                            wall_seconds=seconds)
    if not here:
        raise LaunchError(f"train: rank 0 ran on another node, which holds the outputs "
                          f"({layout.model} was not written here); run the flow on the node "
                          "whose address sorts first, or pass it --local-addr")
    return read_result(layout, ranks, seconds)


def read_result(layout: Layout, device: str, wall_seconds: float) -> LaunchResult:
    """The launch's result from rank 0's `history.csv`: epochs, the last val metric, and the
    training time and rate summed over its epochs."""
    rows = _history(layout.history)
    last = rows[-1] if rows else {}
    train_s = sum(float(r.get("seconds") or 0) for r in rows)
    images = sum(float(r.get("img_per_s") or 0) * float(r.get("seconds") or 0) for r in rows)
    val, miou = last.get("val_top1"), last.get("val_miou")
    return LaunchResult(layout.model, len(rows), float(val) if val else None, train_s,
                        images / train_s if train_s else 0.0, device,
                        float(miou) if miou else None, wall_seconds)


def _history(path: Path) -> list[dict[str, str]]:
    try:
        with path.open() as f:
            return list(csv.DictReader(f))
    except OSError:
        return []
