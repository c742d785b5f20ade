"""Faults on the team stack, on real servers: PostgreSQL restarted between two stages (the
flow goes on), the MLflow server killed during `register` and restarted (the task retries,
the registry ends consistent), the object store down (one line naming the endpoint, no alias
moves)."""

from __future__ import annotations

import time

import pytest
from stack_fixtures import MODEL, TeamStack, assert_consistent, registry_state, vflow, wait_for

pytestmark = [pytest.mark.stack, pytest.mark.slow]


def _wait_task(ts: TeamStack, flow_run_id, name: str, states: set[str],
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


def _decided(state: dict) -> None:
    """Every version carries a decision: none is left half-registered."""
    undecided = {v: d for v, d in state["versions"].items() if not d}
    assert not undecided, state


def test_flow_launches_torchrun_and_goes_on_after_a_postgres_restart(team_stack: TeamStack,
                                                                     flow_run):
    """train.procs_per_node=2: the flow's train task runs torchrun (two gloo processes, one
    model, rank 0 logs); then PostgreSQL restarts between train and evaluate, cutting every
    connection of both servers and any registry lock held: the flow goes on."""
    import json

    from visionflow.mlops import registry_lock

    ts = team_stack
    fr = ts.run_deployment("retrain/team", {"overrides": [
        "train.procs_per_node=2", "flow.retries=3", "flow.retry_delay_s=3"]})
    _wait_task(ts, fr.id, "train", {"Completed"})
    lock_url = ts.stack.client_env()[registry_lock.LOCK_URL_VAR]
    with registry_lock.advisory_lock(lock_url) as held:
        t0 = time.monotonic()
        ts.stack.restart_postgres()  # every connection of both servers is cut
        assert time.monotonic() - t0 < 60
        with pytest.raises(registry_lock.RegistryLockLost, match="lost"):
            held.check()  # a registration holding it would now retry, not move aliases
    final = ts.wait_final(fr.id, timeout=600)
    assert final.state.is_completed(), (final.state.message, ts.logs(fr.id)[-3000:])
    tasks = ts.task_runs(fr.id)
    assert {tasks[s].state_name for s in ("train", "evaluate", "register")} == {"Completed"}
    run_id = json.loads((ts.root / "outputs" / "train" / "run.json").read_text())["run_id"]
    assert ts.client().get_run(run_id).data.tags["world_size"] == "2"
    assert "via torchrun" in ts.logs(fr.id)
    state = registry_state(ts.client())
    assert_consistent(state)
    _decided(state)


def test_mlflow_killed_during_register_then_restarted(team_stack: TeamStack, flow_run):
    before = registry_state(team_stack.client())
    fr = team_stack.run_deployment("retrain/team", {"overrides": [
        "register.min_delta=0.001", "flow.retries=4", "flow.retry_delay_s=4"]})
    _wait_task(team_stack, fr.id, "register", {"Running"})
    time.sleep(3)  # well into the registration (scoring, logging, registering)
    assert team_stack.stack.kill_service("mlflow")
    time.sleep(2)
    team_stack.stack.start_service("mlflow", timeout=300)
    final = team_stack.wait_final(fr.id, timeout=600)
    assert final.state.is_completed(), (final.state.message, team_stack.logs(fr.id)[-3000:])
    tasks = team_stack.task_runs(fr.id)
    assert tasks["register"].run_count >= 2, "register should have been retried"
    assert "transient" in team_stack.logs(fr.id)
    after = registry_state(team_stack.client())
    assert_consistent(after)
    _decided(after)
    new = set(after["versions"]) - set(before["versions"])
    assert [v for v in new if after["versions"][v] in ("promoted", "rejected")], after


def test_object_store_down_fails_in_one_line_and_moves_nothing(team_stack: TeamStack,
                                                              flow_run):
    ts = team_stack
    before = registry_state(ts.client())
    assert ts.stack.stop_service("s3")
    try:
        proc = vflow("stage", "register", "--root", str(ts.root), cwd=ts.root, env=ts.env,
                     timeout=600)
    finally:
        ts.stack.start_service("s3")
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "artifact store unavailable" in errors[0]
    assert ts.stack.url("s3") in errors[0] and ts.stack.url("mlflow") in errors[0]
    assert "Traceback" not in proc.stderr
    assert registry_state(ts.client()) == before  # no version, no alias moved
    assert ts.client().get_model_version_by_alias(MODEL, "champion").version == \
        before["aliases"]["champion"]
