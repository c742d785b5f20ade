"""The local Prefect server (`vflow server start`, SQLite) under write load: deployment
pauses beside a running flow, with and without `prefect_compat.patch_sqlite_write_transactions`.

Each round starts a fresh server of each build (alternating which goes first), serves a flow
that runs small tasks and logs (a retrain run's traffic: task states, events, log batches),
then pauses and resumes its deployment for `--seconds` with the client's retries off
(`PREFECT_CLIENT_MAX_RETRIES=0`): every 503 counts. `--load N` adds N busy-looping processes
(a training beside the server on a 2-core machine). Reported: calls, 503s, the share failed,
and the task runs the flow finished meanwhile (the flow's own speed).

    .venv/bin/python bench/bench_prefect_sqlite.py --rounds 2 --seconds 60 --load 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

VENV = Path(sys.executable).parent
WORK = Path("/tmp/bench_prefect_sqlite")
FLOW = '''
import time
from prefect import flow, get_run_logger, task

@task
def step(i: int) -> int:
    get_run_logger().info("step %d", i)
    return i

@flow
def chatty(n: int = 20000):
    for i in range(n):
        step(i)
        get_run_logger().info("line %d", i)
        time.sleep(0.02)

if __name__ == "__main__":
    chatty.serve(name="chatty")
'''
HAMMER = '''
import sys, time
from prefect.client.orchestration import get_client
from prefect.exceptions import PrefectHTTPStatusError
with get_client(sync_client=True) as c:
    while not (deps := c.read_deployments()):
        time.sleep(0.5)
    dep = deps[0]
    c.create_flow_run_from_deployment(dep.id)
    while not [r for r in c.read_flow_runs() if r.state and r.state.is_running()]:
        time.sleep(0.5)
    log = open(sys.argv[2])
    before = log.read().count("Finished in state Completed")
    ok = failed = 0
    end = time.time() + float(sys.argv[1])
    while time.time() < end:
        for call in (c.pause_deployment, c.resume_deployment):
            try:
                call(dep.id)
                ok += 1
            except PrefectHTTPStatusError as e:
                failed += 1
                assert e.response.status_code == 503, e
        time.sleep(0.1)
    print(ok, failed, log.read().count("Finished in state Completed"))
'''
SERVER = ("from visionflow.orchestration import prefect_compat as c; c.patch_hybrid_bulk_dml(); "
          "{patch}from prefect.cli import app; import sys; sys.argv[0] = 'prefect'; app()")


def run_one(patched: bool, seconds: float, load: int) -> dict[str, float]:
    from visionflow.orchestration.servers import free_port, healthy

    base = WORK / ("patched" if patched else "stock")
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    (base / "flow.py").write_text(FLOW)
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(base / "home"), "PREFECT_API_URL": url,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true",
           "PREFECT_SERVER_LOGGING_LEVEL": "WARNING"}
    code = SERVER.format(patch="c.patch_sqlite_write_transactions(); " if patched else "")
    procs = [subprocess.Popen([str(VENV / "python"), "-c", code, "server", "start", "--host",
                               "127.0.0.1", "--port", str(port), "--no-ui"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)]
    try:
        deadline = time.time() + 240
        while not healthy(f"http://127.0.0.1:{port}/api/health"):
            assert time.time() < deadline and procs[0].poll() is None, "the server did not start"
            time.sleep(1)
        served = base / "serve.log"
        procs.append(subprocess.Popen([str(VENV / "python"), str(base / "flow.py")], env=env,
                                      stdout=served.open("w"), stderr=subprocess.STDOUT,
                                      start_new_session=True))
        procs += [subprocess.Popen([sys.executable, "-c", "while True: pass"],
                                   start_new_session=True) for _ in range(load)]
        out = subprocess.run([str(VENV / "python"), "-c", HAMMER, str(seconds), str(served)], env={
            **env, "PREFECT_CLIENT_MAX_RETRIES": "0"}, capture_output=True, text=True,
            timeout=seconds + 300, check=True).stdout.split()
        ok, failed, tasks = (int(x) for x in out[-3:])
        return {"calls": ok + failed, "failed": failed,
                "failed_share": round(failed / max(ok + failed, 1), 3), "task_runs": tasks}
    finally:
        for p in reversed(procs):  # each with what it started (the flow-run processes)
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--load", type=int, default=2)
    args = ap.parse_args()
    rows: dict[str, list[dict[str, float]]] = {"stock": [], "patched": []}
    for r in range(args.rounds):
        for patched in ((False, True) if r % 2 == 0 else (True, False)):
            row = run_one(patched, args.seconds, args.load)
            rows["patched" if patched else "stock"].append(row)
            print(json.dumps({"round": r, "patched": patched, **row}), flush=True)
    for name, rs in rows.items():
        print(f"{name}: calls {statistics.median(x['calls'] for x in rs):.0f}, "
              f"failed {statistics.median(x['failed_share'] for x in rs):.1%} (median), "
              f"task runs {statistics.median(x['task_runs'] for x in rs):.0f}")


if __name__ == "__main__":
    main()
