"""Multi-process training params, the torchrun command the launcher builds, and when the train
stage goes through it (no servers: fast). The runs themselves are in test_stack.py (the
flow's train on two processes) and test_stack_hosts.py (two nodes)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from visionflow.core.configfile import parse_params
from visionflow.core.errors import ConfigError
from visionflow.core.layout import Layout
from visionflow.orchestration import launch, stage_runner


def _params(**train):
    return parse_params({"train": train})


@pytest.mark.parametrize(("train", "expected"), [
    ({"nodes": 2}, "train.rdzv_endpoint=None: train.nodes > 1 needs the rendezvous"),
    ({"rdzv_endpoint": "nohost"}, "train.rdzv_endpoint='nohost': expected host:port"),
    ({"procs_per_node": 0}, "train.procs_per_node=0"),
])
def test_bad_launch_params_name_key_and_value(train, expected):
    with pytest.raises(ConfigError) as err:
        _params(**train)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_one_process_runs_in_place(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert not launch.wanted(_params())
    assert launch.wanted(_params(procs_per_node=2))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")  # a rank never launches again
    assert not launch.wanted(_params(procs_per_node=2))


def test_standalone_command(tmp_path):
    cmd = launch.command(_params(procs_per_node=2), tmp_path / "p.yaml", tmp_path)
    assert "--standalone" in cmd and "--nproc-per-node=2" in cmd and "--nnodes=1" in cmd
    assert cmd[-6:] == ["-m", "visionflow.stages.train", "--params", str(tmp_path / "p.yaml"),
                        "--root", str(tmp_path)]


def test_multinode_command_says_which_node_hosts_the_rendezvous(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free again once closed
    here = launch.command(_params(nodes=2, rdzv_endpoint=f"127.0.0.1:{port}",
                                  rdzv_id="job"), tmp_path / "p.yaml", tmp_path, "127.0.0.1")
    assert {"--nnodes=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
            "--rdzv-id=job", "--rdzv-conf=is_host=true", "--local-addr=127.0.0.1"} <= set(here)
    elsewhere = launch.command(_params(nodes=2, rdzv_endpoint="192.0.2.1:29400"),
                               tmp_path / "p.yaml", tmp_path)
    assert "--rdzv-conf=is_host=false" in elsewhere  # (TEST-NET-1: never an own address)
    with socket.socket() as s:  # the port is taken: another node on this machine hosts it
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        other = launch.command(_params(nodes=2, rdzv_endpoint=f"127.0.0.1:{busy}"),
                               tmp_path / "p.yaml", tmp_path)
    assert not [a for a in other if a.startswith("--rdzv-conf")]


def test_resolved_params_round_trip(tmp_path):
    from visionflow.core.configfile import load_params

    (tmp_path / "data").mkdir()
    params = parse_params({"train": {"procs_per_node": 2, "epochs": 7}})
    path = launch.resolved_params(params, Layout.at(tmp_path))
    assert path.parent == Layout.at(tmp_path).launch_dir
    assert load_params(path, root=tmp_path) == params


def test_run_stage_launches_train_when_params_ask(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    calls = []
    monkeypatch.setattr(launch, "train", lambda p, lay: calls.append(p.train.procs_per_node))
    monkeypatch.setattr(stage_runner, "stage_function", lambda name: pytest.fail("ran in place"))
    stage_runner.run_stage("train", _params(procs_per_node=2), Layout.at(tmp_path))
    assert calls == [2]


def test_torchrun_logs_in_a_folder_removed_after(monkeypatch, tmp_path):
    (tmp_path / "data").mkdir()
    seen: list[Path] = []

    def fake_run(cmd, cwd):
        logs = Path(next(a for a in cmd if a.startswith("--log-dir=")).split("=", 1)[1])
        assert logs.is_dir() and cmd.index(f"--log-dir={logs}") == 1
        seen.append(logs)
        return 1, "RuntimeError: rank 0 failed"

    monkeypatch.setattr(launch, "run", fake_run)
    with pytest.raises(launch.LaunchError, match="rank 0 failed"):
        launch.train(_params(procs_per_node=2), Layout.at(tmp_path))
    assert seen and not seen[0].exists()


TORCHRUN_TAIL = """[rank1]:   File "visionflow/model/engine.py", line 90, in replicas_agree
[rank1]:     raise RuntimeError(f"DDP replicas differ after training: weight sums "
[rank1]: RuntimeError: DDP replicas differ after training: weight sums 308.4 to 343.8 across ranks
E1206 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 1) local_rank: 1
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html"""


def test_a_failed_launch_names_what_the_rank_raised():
    # torchrun's report comes last and names only exit codes
    assert launch._error_line(TORCHRUN_TAIL) == (
        "RuntimeError: DDP replicas differ after training: weight sums 308.4 to 343.8 across "
        "ranks")
    assert launch._error_line("[rank0]: error: segmentation.batch_size=64: too few\n"
                              + TORCHRUN_TAIL.splitlines()[-1]) == \
        "error: segmentation.batch_size=64: too few"
    assert launch._error_line("starting\nsomething failed here\nbye") == "something failed here"


def test_the_launch_result_counts_training_as_the_stage_does(tmp_path):
    """Seconds and rate from rank 0's history (what its own "train done" line says), the
    launch's wall time beside them; a classifier's line has no mIoU field."""
    from visionflow.core.files import write_csv
    from visionflow.stages import result_line

    layout = Layout.at(tmp_path)
    layout.history.parent.mkdir(parents=True)
    write_csv(layout.history, [{"epoch": 1, "val_top1": 0.5, "img_per_s": 100.0, "seconds": 2.0},
                               {"epoch": 2, "val_top1": 0.75, "img_per_s": 300.0, "seconds": 2.0}])
    result = launch.read_result(layout, "1x2 ranks", 14.0)
    assert (result.epochs_run, result.val_top1, result.seconds) == (2, 0.75, 4.0)
    assert result.images_per_s == 200.0 and result.wall_seconds == 14.0
    line = result_line("launch", result)
    assert "seconds=4 images_per_s=200 device=1x2 ranks wall_seconds=14" in line, line
    assert "val_miou" not in line
