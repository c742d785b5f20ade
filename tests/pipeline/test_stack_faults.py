"""Faults on the team stack, on real servers: the MLflow server killed during `register` and
restarted (the task retries, the registry ends consistent); the object store down (one line
naming the endpoint, no alias moves); the Prefect server and a worker killed mid-train (the
orphaned run ends completed or failed, never half-way). PostgreSQL restarting between two
stages is part of the session's flow run (`stack_fixtures.flow_run`, checked in
test_stack.py)."""

from __future__ import annotations

import pytest
from builders import wait_for
from stack_fixtures import TeamStack, assert_consistent, registry_state, wait_task

pytestmark = [pytest.mark.stack, pytest.mark.slow]


def _decided(state: dict) -> None:
    """Every version carries a decision: none is left half-registered."""
    undecided = {v: d for v, d in state["versions"].items() if not d}
    assert not undecided, state


def registry_lock_held(ts: TeamStack) -> bool:
    """Someone holds the registry's advisory lock: a registration is between reading the
    champion and moving aliases (pg_locks covers every database of the cluster)."""
    from visionflow.mlops.registry_lock import ADVISORY_KEY

    rows = ts.admin_sql("mlflow", "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                        "AND granted AND classid::bigint = %s AND objid::bigint = %s",
                        ADVISORY_KEY)
    return rows[0][0] > 0


def test_mlflow_killed_during_register_then_restarted(team_stack: TeamStack, flow_run):
    ts = team_stack
    before = registry_state(ts.client())
    fr = ts.run_deployment("retrain/team", {"overrides": [  # register alone is stale
        "register.min_delta=0.001", "flow.retries=5", "flow.retry_delay_s=3"]})
    wait_task(ts, fr.id, "register", {"Running"})
    # into the registration (scoring, logging, registering): the registry lock is taken
    wait_for(lambda: registry_lock_held(ts), 300, "the registry lock held", every=0.1)
    assert ts.stack.kill_service("mlflow")
    # kept down until the task gives up on it (the client's own retries cannot bridge this)
    wait_for(lambda: (t := ts.task_runs(fr.id).get("register")) is not None and (
        t.run_count >= 2 or t.state_name in ("AwaitingRetry", "Retrying")), 300,
        "register failing over to a task retry", every=0.2)
    ts.stack.start_service("mlflow", timeout=300)  # the same port, a new process
    final = ts.wait_final(fr.id, timeout=600)
    assert final.state.is_completed(), (final.state.message, ts.logs(fr.id)[-3000:])
    tasks = ts.task_runs(fr.id)
    assert tasks["register"].run_count >= 2, "register should have been retried"
    assert {tasks[s].state_name for s in ("train", "evaluate", "compress")} == {"Cached"}
    after = registry_state(ts.client())
    assert_consistent(after)
    _decided(after)
    new = set(after["versions"]) - set(before["versions"])
    assert [v for v in new if after["versions"][v] in ("promoted", "rejected")], after


def test_object_store_down_fails_in_one_line_and_moves_nothing(team_stack: TeamStack,
                                                              flow_run, monkeypatch):
    from visionflow.core.configfile import load_params
    from visionflow.core.layout import Layout
    from visionflow.mlops.tracking import ArtifactStoreUnavailable
    from visionflow.orchestration.stage_runner import run_stage

    ts = team_stack
    layout = Layout.at(ts.root)
    for key, value in ts.stack.client_env().items():
        monkeypatch.setenv(key, value)
    before = registry_state(ts.client())
    assert ts.stack.stop_service("s3")
    try:
        with pytest.raises(ArtifactStoreUnavailable) as err:
            run_stage("register", load_params(layout.params, root=layout.root), layout)
    finally:
        ts.stack.start_service("s3")
    msg = str(err.value)  # what `vflow stage register` prints after "error: ", exit code 1
    assert "\n" not in msg and msg.startswith("artifact store unavailable")
    assert ts.stack.url("s3") in msg and ts.stack.url("mlflow") in msg
    assert registry_state(ts.client()) == before  # no version, no alias moved


def _running_mlflow_runs(ts: TeamStack) -> list[tuple]:
    return ts.admin_sql("mlflow", "SELECT run_uuid, name FROM runs WHERE status = 'RUNNING'")


def _start_run_until_checkpoint(ts: TeamStack):
    """A forced `retrain/team` run, returned once train has written its first checkpoint."""
    from visionflow.core.layout import Layout

    layout = Layout.at(ts.root)
    fr = ts.run_deployment("retrain/team", {"force": True})
    wait_task(ts, fr.id, "train", {"Running"})
    wait_for(layout.checkpoint.is_file, 600, "train's first checkpoint", every=0.1)
    return fr, layout


def _assert_survived(ts: TeamStack, fr, before: dict) -> None:
    """The run ended completed or failed (never Crashed half-way); a completed run registered
    a version; the champion moved only to a version this whole run promoted; the registry is
    consistent and no MLflow run is left RUNNING. A hung run fails in 5 min, not 15."""
    final = ts.wait_final(fr.id, timeout=300)
    logs = ts.logs(fr.id)[-3000:]
    assert final.state.is_completed() or final.state.is_failed(), (final.state, logs)
    after = registry_state(ts.client())
    assert_consistent(after)
    _decided(after)
    new = set(after["versions"]) - set(before["versions"])
    promoted = [v for v in new if after["versions"][v] == "promoted"]
    if final.state.is_completed():
        assert ts.task_runs(fr.id)["register"].state_name == "Completed", logs
        assert new, after  # the whole run registered a version, promoted or not
    if promoted:
        assert final.state.is_completed() and after["aliases"]["champion"] in promoted
    else:
        assert after["aliases"]["champion"] == before["aliases"]["champion"], (before, after)
    assert _running_mlflow_runs(ts) == []


def test_prefect_server_and_worker_killed_mid_train_then_restarted(team_stack: TeamStack,
                                                                  flow_run):
    """SIGKILL the worker whose subprocess runs the flow (a host's agent dying, its flow run
    orphaned) and the Prefect server while train is between two epochs (its checkpoint is on
    disk); keep the server down until train has ended (its model written, the checkpoint
    gone), so the flow reports train's end and starts evaluate with no API; then start the
    server again on the same port, and a new worker. The run survives (`_assert_survived`):
    its client retried through the outage, or it failed cleanly. Before `orchestration.stdio`
    the orphaned run ended Crashed at evaluate, its MLflow run left RUNNING. One run for both
    faults (each alone cost a forced run of all six stages, about 45 s)."""
    ts = team_stack
    before = registry_state(ts.client())
    fr, layout = _start_run_until_checkpoint(ts)
    assert ts.stack.kill_service("worker-1")
    assert ts.stack.kill_service("prefect")
    wait_for(lambda: not layout.checkpoint.exists() and layout.model.is_file(), 600,
             "train's end with the Prefect server and the worker down", every=0.1)
    ts.stack.start_service("prefect", timeout=300)
    ts.stack.start_worker("worker-1", timeout=300)
    _assert_survived(ts, fr, before)
