"""The local Prefect server (`vflow server start`, SQLite) takes writes beside a running flow:
`prefect_compat.patch_sqlite_write_transactions` (without it, most deployment pauses here
answered 503 "database is locked": BENCHMARKS "Prefect's SQLite write transactions")."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from builders import wait_for
from helpers import REPO

sys.path.insert(0, str(REPO / "bench"))
from bench_prefect_sqlite import FLOW  # noqa: E402 (a served flow: small logging tasks)


def test_deployment_pauses_beside_a_running_flow_never_answer_503(prefect_server, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterName,
        FlowRunFilter,
        FlowRunFilterId,
    )
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    flow = FLOW.replace("n: int = 20000", "n: int = 3000").replace(  # about a minute
        'name="chatty"', 'name="writes-beside-a-run"')
    assert "n: int = 3000" in flow and "writes-beside-a-run" in flow
    (tmp_path / "chatty.py").write_text(flow)
    log = (tmp_path / "serve.log").open("w")
    served = subprocess.Popen([sys.executable, str(tmp_path / "chatty.py")], stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True,
                              env={**os.environ, "PREFECT_API_URL": prefect_server})
    by_name = DeploymentFilter(name=DeploymentFilterName(any_=["writes-beside-a-run"]))
    try:
        with temporary_settings({PREFECT_API_URL: prefect_server, PREFECT_CLIENT_MAX_RETRIES: 0}), \
                get_client(sync_client=True) as c:
            dep = wait_for(lambda: (c.read_deployments(deployment_filter=by_name) or [None])[0],
                           120, "the served deployment")
            run = c.create_flow_run_from_deployment(dep.id)
            this_run = FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))

            def running() -> bool:
                assert served.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                return c.read_flow_run(run.id).state.is_running()

            wait_for(running, 120, "the flow run")
            wait_for(lambda: len(c.read_task_runs(flow_run_filter=this_run)) >= 20, 60,
                     "its first task runs")
            failed, end = [], time.monotonic() + 20
            while time.monotonic() < end:  # the client retries nothing: each 503 shows
                for call in (c.pause_deployment, c.resume_deployment):
                    try:
                        call(dep.id)
                    except PrefectHTTPStatusError as e:
                        failed.append(e.response.status_code)
            assert c.read_flow_run(run.id).state.is_running()
            assert failed == [], f"{len(failed)} writes failed: {sorted(set(failed))}"
    finally:  # the runner's flow-run processes are in its group
        os.killpg(served.pid, signal.SIGKILL)
        served.wait()
        log.close()
