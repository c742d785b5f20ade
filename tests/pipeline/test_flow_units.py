"""The flow's decisions without a Prefect server: which errors retry, which stages run and
get recorded in dvc.lock, the data-change check, the late-run policy, the run summary,
server bookkeeping."""

from __future__ import annotations

import copy
import errno
import json
import shutil
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from helpers import BIN, REPO, make_project

from visionflow.core.config import STAGE_NAMES as STAGES
from visionflow.core.configfile import load_params
from visionflow.core.errors import ConfigError, DataError, ValidationFailed, VisionflowError
from visionflow.core.layout import Layout
from visionflow.data.dvc import dvc_md5
from visionflow.orchestration import freshness, retry, trigger


def _mlflow_error(msg: str, code: str = "INTERNAL_ERROR"):
    from mlflow.exceptions import MlflowException
    from mlflow.protos import databricks_pb2

    return MlflowException(msg, error_code=getattr(databricks_pb2, code))


def _chained(outer: BaseException, cause: BaseException) -> BaseException:
    try:
        raise outer from cause
    except BaseException as err:  # noqa: BLE001
        return err


@pytest.mark.parametrize(
    ("make", "transient"),
    [
        (lambda: ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), True),
        (lambda: TimeoutError("read timed out"), True),
        (lambda: OSError(errno.EIO, "Input/output error"), True),
        (lambda: FileNotFoundError(2, "No such file"), False),
        (lambda: PermissionError(13, "Permission denied"), False),
        (lambda: OSError(errno.ENOSPC, "No space left on device"), False),
        (lambda: ValidationFailed("data gate failed: expect_column_values_to_be_in_set"), False),
        (lambda: ConfigError("params.yaml: train.lr=-1"), False),
        (lambda: DataError("data: no image files found"), False),
        (lambda: ValueError("bad shape"), False),
        (lambda: RuntimeError("CUDA error: device-side assert"), False),
        (lambda: _mlflow_error(
            "API request to http://127.0.0.1:5000/api/2.0/mlflow/runs/create failed with "
            "exception HTTPConnectionPool(host='127.0.0.1', port=5000): Max retries exceeded "
            "with url (Caused by NewConnectionError('Failed to establish a new connection: "
            "[Errno 111] Connection refused'))"), True),
        (lambda: _mlflow_error("x", "TEMPORARILY_UNAVAILABLE"), True),
        (lambda: _mlflow_error("Registered Model with name=x not found",
                               "RESOURCE_DOES_NOT_EXIST"), False),
        (lambda: _chained(RuntimeError("logging failed"), ConnectionResetError()), True),
        (lambda: _chained(ValidationFailed("gate"), OSError(errno.EIO, "io")), False),
    ],
)
def test_is_transient(make, transient):
    assert retry.is_transient(make()) is transient


def test_is_transient_library_errors():
    import requests
    import sqlalchemy.exc
    from prefect.task_engine import TaskRunTimeoutError

    assert retry.is_transient(requests.ConnectionError("refused"))
    resp = requests.Response()
    resp.status_code = 404
    assert not retry.is_transient(requests.HTTPError("404", response=resp))
    resp.status_code = 503
    assert retry.is_transient(requests.HTTPError("503", response=resp))
    assert retry.is_transient(sqlalchemy.exc.OperationalError("INSERT", {}, Exception(
        "database is locked")))
    assert not retry.is_transient(sqlalchemy.exc.OperationalError("SELECT", {}, Exception(
        "no such table: runs")))
    assert not retry.is_transient(TaskRunTimeoutError("Scope timed out after 5 second(s)."))
    assert retry.retry_delays(10, 3) == [10, 20, 40]


def test_late_reason_only_for_auto_scheduled_runs():
    now = datetime(2026, 1, 2, 9, 0, tzinfo=UTC)
    slot = now - timedelta(hours=7)
    reason = trigger.late_reason(slot, now, 6 * 3600, auto_scheduled=True)
    assert reason and "late" in reason and "max_lateness_s=21600" in reason
    assert trigger.late_reason(slot, now, 6 * 3600, auto_scheduled=False) is None  # manual run
    assert trigger.late_reason(now - timedelta(hours=1), now, 6 * 3600, True) is None
    assert trigger.late_reason(slot, now, None, True) is None  # policy off


def test_stage_params_mirror_dvc_yaml():
    tracked = freshness.stage_params(Layout.at(REPO))
    assert list(tracked) == list(STAGES)
    assert {"preset", "data.source", "validate.min_width"} <= set(tracked["validate"])
    assert "data.workers" not in tracked["validate"] and "train.progress" not in tracked["train"]
    assert "train.lr" in tracked["train"] and "evaluate.topk" in tracked["compress"]
    assert freshness.stage_params(Layout.at(REPO / "tests")) == {}  # no dvc.yaml


@pytest.fixture
def proj(tmp_path: Path, digits_dir: Path) -> Layout:
    return Layout.at(make_project(tmp_path / "proj", digits_dir))


def test_overrides_decide_which_stages_run_unrecorded(proj: Layout):
    base = load_params(proj.params)
    tracked = freshness.stage_params(proj)

    def hit(override: str) -> list[str]:
        eff = load_params(proj.params, [override])
        return [s for s in STAGES if freshness.overridden(tracked[s], eff, base)]

    assert hit("train.lr=0.01") == ["train"]
    assert hit("evaluate.topk=[1,2]") == ["evaluate", "compress", "register"]
    assert hit("flow.retries=5") == []  # orchestration settings never invalidate results
    assert hit("train.progress=false") == [] and hit("data.workers=0") == []  # nor runtime
    assert hit("data.image_size=8") == ["validate", "pack"]
    state = freshness.DvcState(proj)  # no .dvc/: nothing is recorded, everything runs
    v = state.verdict("train", base, base, force=False)
    assert (v.run, v.record) == (True, False) and "not a DVC project" in v.reason


def test_a_finished_stage_is_recorded_in_dvc_lock(tmp_path: Path, digits_dir: Path):
    """`DvcState.record` writes the stage's own dvc.lock entry, md5s and params as DVC
    would; a stage that ran but was not recorded has none (its outputs named elsewhere do
    not count)."""
    from projects import assert_stage_recorded

    from visionflow.orchestration.stage_runner import run_stage

    layout = Layout.at(make_project(tmp_path / "proj", digits_dir, git=True))
    params = load_params(layout.params)
    state = freshness.DvcState(layout)
    for stage in ("validate", "pack"):
        run_stage(stage, params, layout)
    state.record("validate")
    assert_stage_recorded(layout.root, "validate")
    with pytest.raises(AssertionError, match="pack not in dvc.lock"):
        assert_stage_recorded(layout.root, "pack")  # ran, not recorded
    assert state.stale("pack") == "not in dvc.lock yet"
    state.record("pack")
    assert_stage_recorded(layout.root, "pack")
    assert state.stale("validate") is None and state.stale("pack") is None


def test_compare_data():
    champ = {"version": "3", "data_hash": "aaa", "gate_decision": "promoted"}
    assert trigger.compare_data("aaa", champ, champ, "x").new_data is False
    new = trigger.compare_data("bbb", champ, champ, "x")
    assert new.new_data is True and new.reason.startswith("new data")
    rejected = {"version": "4", "data_hash": "bbb", "gate_decision": "rejected",
                "gate_reason": "top-1 0.9 does not beat champion"}
    skip = trigger.compare_data("bbb", champ, rejected, "x")
    assert skip.new_data is False and "v4" in skip.reason and "rejected" in skip.reason
    first = trigger.compare_data("bbb", {}, {}, "x")
    assert first.new_data is True and first.reason == "no champion yet"


def test_check_data_dvc_md5_shortcut(tmp_path: Path):
    """Real DVC (a git+DVC project, `dvc status`) and a real MLflow registry whose versions
    carry the tags register writes; nothing patched."""
    from builders import write_imagefolder

    from visionflow.mlops import registry

    data = write_imagefolder(tmp_path / "src", {"train/cat": 3, "train/dog": 3})
    layout = Layout.at(make_project(tmp_path / "proj", data, git=True))
    params = load_params(layout.params)
    md5 = dvc_md5(layout.dvc_file("data"))
    assert len(md5) == 32
    first = trigger.check_data(params, layout, False)
    assert (first.new_data, first.reason) == (True, "no champion yet")

    client = registry.client_for(layout)
    client.create_registered_model("visionflow-classifier")

    def version(source: str) -> str:
        tags = {"data_hash": "h" * 32, "dvc_data_md5": md5,
                "params": json.dumps({**params.dump(), "data": {"source": source}})}
        mv = client.create_model_version("visionflow-classifier",
                                         source=(tmp_path / "none").as_uri(), tags=tags)
        client.set_registered_model_alias("visionflow-classifier", "champion", mv.version)
        return str(mv.version)

    version("data")
    check = trigger.check_data(params, layout, False)
    assert (check.new_data, check.method) == (False, "dvc md5")  # nothing hashed
    assert "champion v1" in check.reason

    extra = layout.root / "data" / "train" / "cat" / "new.png"  # data/ edited, not added
    shutil.copy(layout.root / "data" / "train" / "dog" / "000.png", extra)
    assert trigger.check_data(params, layout, False).new_data is None  # validate decides
    extra.unlink()
    assert trigger.check_data(params, layout, False).new_data is False

    version("/elsewhere.tar")  # champion (and latest) trained from another data source
    assert trigger.check_data(params, layout, False).new_data is None


def test_refresh_data_without_dvc(proj: Layout):
    assert "not tracked by DVC" in trigger.refresh_data(load_params(proj.params), proj)


COMP = {"original": {"format": "torch fp32", "size_bytes": 4_000_000, "top1": 0.9},
            "variants": {"int8": {"format": "onnx int8", "size_bytes": 1_000_000,
                                  "size_ratio": 0.25, "top1": 0.895, "top1_drop": 0.005},
                         "prune": {"format": "torch", "size_bytes": 4_000_000,
                                   "size_ratio": 1.0, "top1": 0.9, "top1_drop": 0.0}}}


def test_compression_choice_in_the_summary():
    from visionflow.orchestration import report as flow_report

    comp = copy.deepcopy(COMP)
    assert flow_report.compression_choice(comp)[0] == "int8"
    comp["variants"]["int8"]["top1_drop"] = 0.05
    assert flow_report.compression_choice(comp)[0] == "original"
    assert flow_report.compression_choice({**comp, "choice": "prune"})[0] == "prune"
    new_style = {"selected": {"name": "int8"}, "selected_reason": "smallest within 1 point",
                 "recommended": "int8", "original": comp["original"], "variants": {
                     "int8": {"runtime": "onnxruntime", "size_bytes": 10, "top1_drop_points": 0.5}}}
    assert flow_report.compression_choice(new_style) == ("int8", "smallest within 1 point")
    none_fit = {**new_style, "selected": None, "recommended": "original",
                "recommended_reason": "nothing within the budget"}
    assert flow_report.compression_choice(none_fit) == ("original", "nothing within the budget")
    assert "| int8 | onnxruntime |" in flow_report.summary_markdown({"compress": new_style})
    assert "Registered as version 5 `@compact`." in flow_report.summary_markdown(
        {"compress": new_style, "compact": {"version": "5", "alias": "compact"}})


def test_summary_markdown_sections_and_links():
    from visionflow.orchestration import report as flow_report

    comp = copy.deepcopy(COMP)
    comp["variants"]["int8"]["top1_drop"] = 0.05
    links = flow_report.mlflow_links("http://h:5000/", {"run_id": "r1", "experiment_id": "7"},
                                     "m", "4", "5")
    assert {k: v["url"] for k, v in links.items()} == {
        "mlflow-run": "http://h:5000/#/experiments/7/runs/r1",
        "model-version": "http://h:5000/#/models/m/versions/4",
        "compact-version": "http://h:5000/#/models/m/versions/5"}
    assert [v["text"] for v in links.values()] == [  # each link says what it opens
        "MLflow run r1 (all six stages)", "m v4 (model card)", "m v5 @compact (model card)"]
    md = flow_report.summary_markdown({
        "headline": "v4 promoted to @champion", "model_name": "m",
        "data": {"source": "data", "data_hash": "abc", "decision": "new data",
                 "dvc_md5": "d41d8", "dvc_file": "data.dvc"},
        "outcome": {"label": "promoted", "message": "promoted v4: top-1 0.9000 > 0.8500 (v3)"},
        "champion_metrics": {"version": "3", "metrics": {"top1": 0.85}},
        "validation": {"files": 10, "usable": 9, "quarantined": {"truncated": 1},
                       "classes": ["a", "b"],
                       "expectations": [{"expectation": "expect_x", "column": "c",
                                         "success": False, "observed": "1 | 2",
                                         "description": "d"}]},
        "metrics": {"top1": 0.9, "f1_macro": 0.8, "iou_per_class": [0.1]},
        "gate": {"decision": "promoted", "reason": "beats v3", "version": "4",
                 "champion_before": "v3", "champion_after": "v4",
                 "test_images": "90 of 100 test images scored, 10 excluded"},
        "compress": comp, "links": links,
        "stages": [{"name": "train", "state": "cached", "seconds": 1.5},
                   {"name": "evaluate", "state": "ran", "seconds": 2.34567}]})
    for text in ("# retrain: v4 promoted", "## Data", "## Validation", "**NO**", "1 \\| 2",
                 "## Metrics", "| top1 | 0.9000 | 0.8500 | +0.0500 |", "## Gate", "beats v3",
                 "**Outcome:** promoted v4: top-1 0.9000 > 0.8500 (v3)", "| dvc md5 (data.dvc) "
                 "| `d41d8` |", "| new data? | new data |", "[m v5 @compact (model card)]",
                 "| evaluate | ran | 2.3 |",
                 "| test images | 90 of 100 test images scored, 10 excluded |", "## Compression",
                 "Choice: **original**", "Not registered as a `compact` version", "## Links", "(http://h:5000/#/models/m/versions/4)",
                 "| train | cached |"):
        assert text in md, text
    assert "| | |" not in md and "2.34567" not in md  # no empty header row, seconds rounded


def test_metric_rows_outcome_and_headline():
    from visionflow.orchestration import report as flow_report

    rows = flow_report.metric_rows({"top1": 0.9, "n_test": 5, "ok": True, "iou_per_class":
                                    [0.5]}, {"version": "3", "metrics": {"top1": 0.85}})
    assert rows == [{"metric": "top1", "this run": 0.9, "champion v3": 0.85,
                     "change": "+0.0500"}]  # headline only: no n_test, no iou[i]
    assert flow_report.outcome_message("3", {
        "promote": True, "challenger_top1": 0.983, "champion_top1": 0.975,
        "champion_version": "2"}) == "promoted v3: top-1 0.9830 > 0.9750 (v2)"
    assert flow_report.outcome_message("4", {"promote": False, "reason": "kept champion v3"}) \
        == "rejected v4: kept champion v3"
    seg = {"promote": True, "reason": "no champion yet", "challenger_top1": 0.9463,
           "champion_top1": None, "metric": "mIoU"}  # a segmenter's gate: its mIoU
    assert flow_report.outcome_message("1", seg) == "promoted v1: mIoU 0.9463, no champion yet"
    seg_comp = {"task": "segmentation", "selected": {"name": "int8"}, "selected_reason": "-",
                "original": {"format": "torch fp32", "size_bytes": 2_000_000, "miou": 0.9463},
                "variants": {"int8": {"format": "onnx int8", "size_bytes": 590_000,
                                      "size_ratio": 0.3, "miou": 0.9459,
                                      "miou_drop_points": 0.03}}}
    table = flow_report.summary_markdown({"compress": seg_comp})
    assert "| mIoU | mIoU drop (points) |" in table and "top-1" not in table, table
    assert "| int8 | onnx int8 | 0.5900 | 0.3000 | 0.9459 | 0.0300 |" in table, table
    assert flow_report.headline("3", "promoted", "champion", "v2") == "v3 promoted to @champion"
    assert flow_report.headline("4", "rejected", None, "v3") == "v4 rejected, champion v3 kept"
    assert flow_report.headline("1", "rejected", None, None) == "v1 rejected, no champion yet"
    failed = flow_report.summary_markdown({"headline": "failed at validate", "error": {
        "stage": "validate", "message": "ValidationFailed: data gate failed"}})
    assert "Stage **validate** failed" in failed and "no alias moved" in failed


def test_server_bookkeeping(tmp_path: Path):
    from visionflow.orchestration import servers as server

    lay = Layout.at(tmp_path)
    st = server.status(server.PREFECT, lay)
    assert not st.running and not st.healthy and "not running" in st.line()
    server.state_dir(lay).mkdir(parents=True)
    (server.state_dir(lay) / "prefect.json").write_text(json.dumps(
        {"pid": 2**22 + 12345, "url": "http://127.0.0.1:9"}))  # a pid that does not exist
    st = server.status(server.PREFECT, lay)
    assert not st.running and "stale" in st.note
    assert not server.stop(server.PREFECT, lay).running
    assert not (server.state_dir(lay) / "prefect.json").exists()
    assert not server.healthy("http://127.0.0.1:9/api/health", timeout=0.5)

    with socket.socket() as s:  # a busy port is refused before anything starts
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(VisionflowError, match="already in use"):
            server.start(server.PREFECT, lay, port=port)
    with pytest.raises(VisionflowError, match="no Prefect server"), \
            server.prefect_api(lay, require=True):
        pass
    with server.prefect_api(lay) as url:
        assert url is None  # no server: Prefect's temporary API will be used


def test_port_zero_picks_again_when_the_port_is_taken(tmp_path: Path, monkeypatch):
    from visionflow.orchestration import servers as server

    port = server.free_port()
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert server.port_free("127.0.0.1", port) and (port < low or low <= 21000)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        picks = [busy.getsockname()[1]] * 3
        monkeypatch.setattr(server, "free_port", lambda host: picks.pop())
        with pytest.raises(VisionflowError, match="already in use"):  # lost 3 times: give up
            server.start(server.PREFECT, Layout.at(tmp_path), port=0)
        assert not picks
        launched: list[int] = []

        def fake_launch(service, layout, host, port, *rest):
            launched.append(port)
            if not server.port_free(host, port):
                raise server._PortLost(f"{host}:{port} is already in use")
            return f"started on {port}"

        free = port
        picks[:] = [free, busy.getsockname()[1]]  # pop(): the busy port first, then a free one
        monkeypatch.setattr(server, "_launch", fake_launch)
        assert server.start(server.PREFECT, Layout.at(tmp_path), port=0) == f"started on {free}"
        assert launched == [busy.getsockname()[1], free]


def test_prefect_api_url_that_does_not_answer(tmp_path: Path):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from visionflow.orchestration import servers as server

    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}), \
            pytest.raises(VisionflowError, match="no Prefect server answers"), \
            server.prefect_api(Layout.at(tmp_path)):
        pass


def test_prefect_compat_patch_drops_the_state_key():
    from sqlalchemy.ext.hybrid import hybrid_property

    from visionflow.orchestration.prefect_compat import _drop, patch_hybrid_bulk_dml

    patched = patch_hybrid_bulk_dml()
    if hasattr(hybrid_property, "bulk_dml"):  # SQLAlchemy 2.1
        from prefect.server.database import orm_models

        assert vars(orm_models.FlowRun)["state"].bulk_dml_setter is not None
        assert patch_hybrid_bulk_dml() == []  # idempotent
    else:
        assert patched == []
    mapping = {"id": 1, "state": {"type": "SCHEDULED"}}
    _drop("state")(object, mapping, mapping["state"])
    assert mapping == {"id": 1}


def test_flow_config_section():
    from visionflow.core.configfile import apply_overrides, parse_params, read_params_file

    raw = read_params_file(REPO / "params.yaml")
    cfg = parse_params(raw).flow
    assert cfg.retries >= 1 and cfg.cache and cfg.schedule.cron == "0 3 * * *"
    assert set(cfg.timeout_s) <= set(STAGES)
    for bad, msg in [("flow.schedule.cron=0 3 * *", "not a cron expression"),
                     ("flow.schedule.timezone=Mars/Olympus", "unknown time zone"),
                     ("flow.timeout_s.trian=5", "unknown stage"),
                     ("flow.retries=-1", "greater than or equal to 0")]:
        with pytest.raises(ConfigError, match=msg):
            parse_params(apply_overrides(raw, [bad]))


def test_prefect_yaml_declares_the_deployment():
    doc = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deps = {f"{d['entrypoint'].rsplit(':', 1)[1]}/{d['name']}": d for d in doc["deployments"]}
    assert set(deps) == {"retrain/nightly", "retrain/team", "tune/team"}
    tune = deps["tune/team"]  # a search on any host's worker, one study for all
    assert tune["entrypoint"] == "flows/tune.py:tune" and tune["pull"] == deps["retrain/team"][
        "pull"] and "schedules" not in tune
    team = deps["retrain/team"]  # any host's worker, in its own checkout; hosts train at once
    assert team["entrypoint"] == "flows/retrain.py:retrain" and "concurrency_limit" not in team
    assert team["pull"] == [{"prefect.deployments.steps.set_working_directory": {
        "directory": "{{ $VFLOW_CHECKOUT }}"}}]
    assert team["work_pool"]["name"] == "visionflow-process" and "schedules" not in team
    dep = deps["retrain/nightly"]
    assert dep["entrypoint"] == "flows/retrain.py:retrain"
    assert (REPO / dep["entrypoint"].split(":")[0]).is_file()
    assert dep["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
    assert dep["parameters"]["only_new_data"] is True
    assert dep["work_pool"]["name"] == "visionflow-process"
    assert dep["schedules"][0]["cron"] == "0 3 * * *"
    assert {"process", "docker", "kubernetes"} <= set(doc["definitions"]["work_pools"])


def test_cli_server_commands_are_light_and_fail_clearly(tmp_path: Path):
    code = ("import sys, visionflow.cli.main, visionflow.cli.servers; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('prefect', 'mlflow', 'torch', 'great_expectations')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
    vflow = str(BIN / "vflow")
    t0 = time.monotonic()
    st = subprocess.run([vflow, "server", "status", "--root", str(tmp_path)],
                        capture_output=True, text=True)
    assert st.returncode == 1 and "not running" in st.stdout
    assert time.monotonic() - t0 < 30
    help_ = subprocess.run([vflow, "--help"], capture_output=True, text=True, check=True)
    assert all(c in help_.stdout for c in ("server", "ui", "schedule"))
