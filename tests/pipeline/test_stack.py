"""The whole `retrain` flow on the team stack, through a Prefect worker (the session's
`flow_run`): the run is in PostgreSQL, its artifacts are objects in the S3 store (listed
through the S3 API), the champion loads in another process that knows only the tracking URI,
and `dvc push` then `dvc pull` into a fresh clone brings back the data and the model. On the
way the flow launched train through torchrun (two processes) and went on after PostgreSQL
restarted between two stages. Real servers throughout (the session's `team_stack`)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
from helpers import BIN, job_runners, run
from projects import assert_stage_recorded
from stack_fixtures import (
    CLIENT_ENV,
    MODEL,
    TeamStack,
    assert_consistent,
    registry_state,
    vflow,
)

pytestmark = [pytest.mark.stack, pytest.mark.slow]


def test_status_and_idempotent_up(team_stack: TeamStack):
    status = vflow("stack", "status", "--root", str(team_stack.root), cwd=team_stack.root)
    assert status.returncode == 0, status.stdout + status.stderr
    for name in ("postgres", "s3", "mlflow", "prefect", "worker-1"):
        assert any(line.startswith(name) and " up " in line
                   for line in status.stdout.splitlines()), status.stdout
    mlflow_pid = next(s.pid for s in team_stack.stack.status() if s.name == "mlflow")
    assert job_runners(mlflow_pid) == []  # MLflow's GenAI job runner stays off
    again = vflow("stack", "up", "--root", str(team_stack.root), "--no-deploy", "--no-ui",
                  cwd=team_stack.root)
    assert again.returncode == 0, again.stdout + again.stderr
    creds = team_stack.stack.credentials()
    assert creds.admin not in again.stdout  # printed once, when generated: not again
    assert "credentials: " in again.stdout
    env = team_stack.stack.layout.stack_env.read_text()
    assert f"MLFLOW_TRACKING_URI={team_stack.stack.url('mlflow')}" in env
    assert oct(team_stack.stack.layout.stack_credentials.stat().st_mode)[-3:] == "600"
    ignored = run(["git", "check-ignore", str(team_stack.stack.layout.stack_credentials)],
                  team_stack.root, check=False)
    assert ignored.returncode == 0, "the credentials file must be git-ignored"


def test_run_and_registry_are_in_postgres(team_stack: TeamStack, flow_run):
    root = team_stack.root
    run_id = json.loads((root / "outputs" / "train" / "run.json").read_text())["run_id"]
    rows = team_stack.admin_sql("mlflow", "SELECT status FROM runs WHERE run_uuid = %s",
                                (run_id,))
    assert rows == [("FINISHED",)]
    versions = team_stack.admin_sql(
        "mlflow", "SELECT version FROM model_versions WHERE name = %s", (MODEL,))
    alias = team_stack.admin_sql(
        "mlflow", "SELECT version FROM registered_model_aliases WHERE name = %s AND "
        "alias = 'champion'", (MODEL,))
    assert alias and alias[0][0] in {v for (v,) in versions}
    fr_id = flow_run["flow_run"].id
    prefect_row = team_stack.admin_sql(
        "prefect", "SELECT state_type FROM flow_run WHERE id = %s", (fr_id,))
    assert prefect_row == [("COMPLETED",)]
    tasks = team_stack.task_runs(fr_id)
    assert {"validate", "pack", "train", "evaluate", "compress", "register"} <= set(tasks)
    # the flow ran in the worker's checkout (the `team` deployment's VFLOW_CHECKOUT)
    reg = json.loads((root / "outputs" / "register" / "registration.json").read_text())
    assert reg["model_name"] == MODEL and reg["run_id"] == run_id
    assert_consistent(registry_state(team_stack.client()))


def test_train_ran_through_torchrun_and_a_postgres_restart_did_not_stop_the_flow(
        team_stack: TeamStack, flow_run):
    root = team_stack.root
    tasks = team_stack.task_runs(flow_run["flow_run"].id)
    assert all(tasks[s].state_name == "Completed" for s in ("train", "evaluate", "register"))
    run_id = json.loads((root / "outputs" / "train" / "run.json").read_text())["run_id"]
    run = team_stack.client().get_run(run_id)
    assert run.data.tags["world_size"] == "2"  # two ranks; rank 0 alone opened the run
    assert len((root / "outputs" / "train" / "history.csv").read_text().splitlines()) == 4
    assert flow_run["restart_s"] < 60
    # the registry lock held across the restart knew it was gone: a registration holding
    # it would have retried instead of moving an alias
    assert flow_run["lock_lost"] and "lost" in flow_run["lock_lost"]
    assert_stage_recorded(root, "train")  # the flow recorded the stage itself


def test_artifacts_are_objects_in_s3(team_stack: TeamStack, flow_run):
    root = team_stack.root
    run_id = json.loads((root / "outputs" / "train" / "run.json").read_text())["run_id"]
    client = team_stack.client()
    exp = client.get_experiment(client.get_run(run_id).info.experiment_id)
    assert exp.artifact_location.startswith("mlflow-artifacts:/")  # the server decides
    keys = team_stack.s3_keys("mlflow", f"artifacts/{exp.experiment_id}/")
    assert f"artifacts/{exp.experiment_id}/{run_id}/artifacts/train/history.csv" in keys
    assert any(k.endswith("/MLmodel") for k in keys), keys[:20]
    assert any(k.endswith("model.pt") for k in keys), keys[:20]
    # nothing was written to the checkout's local store
    local = root / "mlruns" / "artifacts"
    assert not local.exists() or not any(local.iterdir())


def test_champion_loads_knowing_only_the_tracking_uri(team_stack: TeamStack, flow_run,
                                                      tmp_path: Path):
    """`vflow predict` in a bare folder, with MLFLOW_TRACKING_URI alone: no S3 keys, no
    project, and every HTTP request except to the tracking server sent to a dead proxy,
    so the weights can only come through the server."""
    image = next(p for p in sorted((team_stack.root / "data").rglob("*.png")))
    # the server as "localhost", exempt from the proxy; the store (and anything else, as
    # 127.0.0.1 or a name) through the dead one
    mlflow_url = f"http://localhost:{team_stack.stack.port('mlflow')}"
    dead = "http://127.0.0.1:9"
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "DO_NOT_TRACK": "true",
           "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_TRACKING_URI": mlflow_url,
           "http_proxy": dead, "HTTP_PROXY": dead, "https_proxy": dead,
           "no_proxy": "localhost",
           **{k: os.environ[k] for k in ("PYTHONPATH",) if k in os.environ},  # this code
           **{k: os.environ[k] for k in CLIENT_ENV if k.startswith("MLFLOW_")}}
    proc = subprocess.run([str(BIN / "vflow"), "predict", "-m", f"models:/{MODEL}@champion",
                           str(image), "-o", "-", "--format", "json", "--root", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout)
    assert rows[0]["label"] in {p.name for p in (team_stack.root / "data" / "train").iterdir()}


def _md5s(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_dvc_push_then_pull_into_a_fresh_clone(team_stack: TeamStack, flow_run,
                                               tmp_path: Path):
    from visionflow.core.layout import Layout
    from visionflow.stack.core import configure_dvc_remote

    root, dvc = team_stack.root, str(BIN / "dvc")
    lock = root / "dvc.lock"
    if "outputs/train/model.pt" not in (lock.read_text() if lock.exists() else ""):
        run([dvc, "commit", "-f", "-q"], root)  # record the flow's outputs in dvc.lock
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-q", "-m", "trained on the stack", "--allow-empty"], root)
    pushed = run([dvc, "push"], root)
    assert "pushed" in pushed.stdout.lower() or "up to date" in pushed.stdout.lower()
    assert team_stack.s3_keys("dvc", "store/"), "dvc push wrote nothing to the S3 store"

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(root), str(clone)], tmp_path)
    creds = team_stack.stack.credentials()
    configure_dvc_remote(Layout.at(clone), team_stack.stack.url("s3"), creds.s3_access_key,
                         creds.s3_secret_key)
    run([dvc, "pull"], clone)
    assert _md5s(clone / "data") == _md5s(root / "data")
    model = "outputs/train/model.pt"
    assert (clone / model).read_bytes() == (root / model).read_bytes()


def test_a_long_model_card_fits_the_postgres_registry(team_stack: TeamStack):
    """A card past MLflow's 5,000-character description column (a model of 200 classes:
    about 6,000) is refused by PostgreSQL; fitted, it is stored without its params section,
    ending with where the whole card is."""
    from mlflow.exceptions import MlflowException

    from visionflow.mlops.card import fit_description

    client, name = team_stack.client(), "long-card"
    client.create_registered_model(name)
    version = client.create_model_version(name, "s3://nowhere/model").version
    classes = ", ".join(f"class_{i:03d}" for i in range(200))
    card = (f"# {name} v{version}: fast\n\n## Model\n| classes | 200: {classes[:1500]} |\n\n"
            "## Params\n```yaml\n" + "train:\n" + "  lr: 0.5\n" * 400 + "```\n\n"
            "## Champion gate: PROMOTED\n\nno champion yet\n")
    assert len(card) > 5000
    with pytest.raises(MlflowException, match="value too long"):
        client.update_model_version(name, version, description=card)
    fitted = fit_description(card, "the artifact register/model_card.md of run r1")
    client.update_model_version(name, version, description=fitted)
    stored = client.get_model_version(name, version).description
    assert stored == fitted and len(stored) <= 5000
    assert "## Params" not in stored and "## Champion gate: PROMOTED" in stored
    assert stored.rstrip().endswith("the whole card is the artifact register/model_card.md "
                                     "of run r1.*")
