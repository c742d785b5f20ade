"""The training engine on CPU: resume equivalence, EMA, transfer learning, schedules, DDP."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import BIN, make_project, run, write_params

from visionflow.core.config import TrainConfig
from visionflow.core.configfile import load_params
from visionflow.core.layout import Layout
from visionflow.model import engine
from visionflow.model.classifier import load_classifier
from visionflow.model.pretrained import load_pretrained
from visionflow.orchestration.stage_runner import run_stage
from visionflow.stages import train


def _copy(src: Path, dest: Path, **overrides) -> Layout:
    shutil.copytree(src, dest)
    from helpers import TINY

    write_params(dest / "params.yaml", {**TINY, "train.progress": False, **overrides})
    return Layout.at(dest)


def _weights(layout: Layout) -> dict[str, torch.Tensor]:
    return torch.load(layout.model, weights_only=True)["state_dict"]


def test_resume_equals_uninterrupted(small, tmp_path, monkeypatch):
    full = _small(small, tmp_path / "full", **{"train.epochs": 2})
    run_stage("train", load_params(full.params), full)

    cut = _small(small, tmp_path / "cut", **{"train.epochs": 2})
    calls = {"n": 0}
    real = train._should_stop

    def crash_after_first_epoch(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt  # the process dies right after epoch 1's checkpoint
        return real(*args, **kw)

    monkeypatch.setattr(train, "_should_stop", crash_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        run_stage("train", load_params(cut.params), cut)
    assert cut.checkpoint.is_file() and not cut.model.exists()
    monkeypatch.setattr(train, "_should_stop", real)
    result = run_stage("train", load_params(cut.params), cut)
    assert result.epochs_run == 2
    assert not cut.checkpoint.exists()

    a, b = _weights(full), _weights(cut)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_checkpoint_for_other_params_is_ignored(small, tmp_path):
    lay = _small(small, tmp_path / "p", **{"train.epochs": 1})
    lay.checkpoint.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config_hash": "something-else"}, lay.checkpoint)
    result = run_stage("train", load_params(lay.params), lay)
    assert result.epochs_run == 1


def test_ema_tracks_the_formula():
    model = torch.nn.Linear(3, 2)
    ema = engine.make_ema(model, 0.9)
    w0 = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(1, 2)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(2, 2)
    # first update copies, the second blends: 0.9 * (w0 + 1) + 0.1 * (w0 + 2)
    torch.testing.assert_close(ema.module.weight, w0 + 1.1)


@pytest.fixture(scope="module")
def small(tmp_path_factory, digits_dir) -> Path:
    """validate + pack done on 12 digits per class and split: epochs take a second."""
    root = make_project(tmp_path_factory.mktemp("train") / "small", digits_dir,
                        {"data.limit_per_class": 12})
    layout = Layout.at(root)
    params = load_params(layout.params)
    for name in ("validate", "pack"):
        run_stage(name, params, layout)
    return root


def _small(small: Path, dest: Path, **overrides) -> Layout:
    lay = _copy(small, dest, **{"data.limit_per_class": 12, "train.batch_size": 16,
                                **overrides})
    return lay


def test_ema_model_is_what_gets_saved(small, tmp_path):
    """Same seed, same data: only the EMA differs, so the saved weights must differ."""
    saved = {}
    for decay in (None, 0.5):
        lay = _small(small, tmp_path / f"ema{decay}", **{"train.epochs": 1,
                                                          "train.ema_decay": decay})
        run_stage("train", load_params(lay.params), lay)
        saved[decay] = _weights(lay)
    assert not torch.equal(saved[None]["net.head.weight"], saved[0.5]["net.head.weight"])


def test_early_stopping_stops_when_val_stalls(small, tmp_path):
    """AlexNet (no BatchNorm) at lr 1e-12: the weights cannot move, val accuracy is flat, so
    patience 2 stops after epoch 3 of 6."""
    lay = _small(small, tmp_path / "es", **{"train.model": "alexnet", "train.lr": 1e-12,
                                             "train.epochs": 6, "train.early_stop_patience": 2,
                                             "train.calibrate": False})
    result = run_stage("train", load_params(lay.params), lay)
    assert result.epochs_run == 3
    rows = lay.history.read_text().splitlines()
    assert len(rows) == 1 + 3


def test_a_loss_that_is_not_a_number_stops_the_stage_before_it_writes(small, tmp_path,
                                                                      capsys):
    """AlexNet at lr 1e30 (no BatchNorm to hold it): the loss is NaN within the first epoch;
    the stage stops after it in one line naming the key, with no model, checkpoint or
    history written. At lr 5 the loss stays finite but above ln(10): a warning."""
    from visionflow.core.errors import VisionflowError

    lay = _small(small, tmp_path / "nan", **{"train.model": "alexnet", "train.lr": 1e30,
                                              "train.epochs": 3})
    with pytest.raises(VisionflowError, match=r"^train: the loss is not a number in epoch 1: "
                                              r"training diverged; lower train.lr \(now 1e\+30\)$"):
        run_stage("train", load_params(lay.params), lay)
    assert not lay.model.exists() and not lay.checkpoint.exists() and not lay.history.exists()

    lay = _small(small, tmp_path / "high", **{"train.model": "alexnet", "train.lr": 5.0,
                                               "train.epochs": 1})
    capsys.readouterr()
    run_stage("train", load_params(lay.params), lay)
    assert "is above a uniform guess's ln(10) = 2.3" in capsys.readouterr().out


def test_time_budget_stops_after_the_epoch_that_spends_it(small, tmp_path):
    lay = _small(small, tmp_path / "tb", **{"train.epochs": 4, "train.time_budget_s": 1e-3})
    assert run_stage("train", load_params(lay.params), lay).epochs_run == 1


def test_cpu_training_keeps_freed_memory_in_its_heap(small, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(engine, "keep_freed_cpu_memory", lambda: calls.append("kept") or True)
    lay = _small(small, tmp_path / "heap", **{"train.epochs": 1})
    run_stage("train", load_params(lay.params), lay)
    assert calls == ["kept"]


def test_backbone_unfreezes_after_freeze_epochs(small, tmp_path):
    src = _small(small, tmp_path / "src", **{"train.epochs": 1})
    run_stage("train", load_params(src.params), src)
    pretrained = _weights(src)
    dst = _small(small, tmp_path / "dst", **{"train.epochs": 2, "train.pretrained": str(src.model),
                                              "train.freeze_epochs": 1})
    run_stage("train", load_params(dst.params), dst)
    tuned = _weights(dst)
    conv = "net.layers.1.0.weight"
    assert not torch.equal(tuned[conv], pretrained[conv])  # trained in epoch 2


def test_torchvision_weight_names_come_from_the_registry_name():
    from torchvision.models import DenseNet121_Weights, ResNet18_Weights, ResNet50_Weights

    from visionflow.core.errors import ConfigError
    from visionflow.model.pretrained import torchvision_weights

    assert torchvision_weights("resnet18", "DEFAULT") is ResNet18_Weights.DEFAULT
    assert torchvision_weights("resnet50", "IMAGENET1K_V2") is ResNet50_Weights.IMAGENET1K_V2
    assert torchvision_weights("densenet121", "DEFAULT") is DenseNet121_Weights.DEFAULT
    with pytest.raises(ConfigError, match="model 'fast' has no torchvision weights"):
        torchvision_weights("fast", "DEFAULT")
    with pytest.raises(ConfigError, match="unknown weights for resnet18, choose one of"):
        torchvision_weights("resnet18", "IMAGENET22K")


def test_torchvision_weights_offline_is_one_config_error(tmp_path, monkeypatch, no_network):
    """No network here: the download fails (a closed local proxy makes it fail at once) and
    the user gets one line naming the key and the URL."""
    from visionflow.core.errors import ConfigError
    from visionflow.model.classifier import Arch, build_classifier

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    model = build_classifier(Arch("resnet18", 10, 32))
    with pytest.raises(ConfigError) as err:
        load_pretrained(model, "torchvision:DEFAULT", "resnet18")
    msg = str(err.value)
    assert msg.startswith("train.pretrained='torchvision:DEFAULT': cannot download https://")
    assert "resnet18" in msg and "\n" not in msg


def test_training_run_logs_system_metrics(small, tmp_path):
    from mlflow import MlflowClient

    from visionflow.mlops import tracking

    lay = _small(small, tmp_path / "sys", **{"train.epochs": 1})
    run_stage("train", load_params(lay.params), lay)
    run_id = json.loads(lay.run_info.read_text())["run_id"]
    tracking.setup(lay)
    keys = MlflowClient().get_run(run_id).data.metrics
    assert "system/cpu_utilization_percentage" in keys
    assert "system/system_memory_usage_megabytes" in keys


def test_transfer_learning_from_saved_weights(small, tmp_path, capsys):
    src = _small(small, tmp_path / "src", **{"train.epochs": 1, "train.model": "resnet18"})
    run_stage("train", load_params(src.params), src)
    pretrained = _weights(src)

    # Fine-tune on 10 classes with the backbone frozen the whole time: backbone unchanged,
    # head trained from scratch.
    dst = _small(small, tmp_path / "dst", **{
        "train.epochs": 1, "train.model": "resnet18", "train.pretrained": str(src.model),
        "train.freeze_epochs": 1})
    run_stage("train", load_params(dst.params), dst)
    assert f"pretrained: 60 of 62 parameter tensors from {src.model}; the others (the head) " \
           "start fresh" in capsys.readouterr().out
    tuned = _weights(dst)
    conv = "net.layer1.0.conv1.weight"
    torch.testing.assert_close(tuned[conv], pretrained[conv])
    assert not torch.equal(tuned["net.fc.weight"], pretrained["net.fc.weight"])


def test_pretrained_with_no_matching_tensor_fails(tmp_path):
    from visionflow.core.errors import ConfigError
    from visionflow.model.classifier import Arch, build_classifier

    bogus = tmp_path / "w.pt"
    torch.save({"state_dict": {"nothing": torch.zeros(1)}}, bogus)
    model = build_classifier(Arch("alexnet", 10, 16))
    with pytest.raises(ConfigError, match="no tensor matches"):
        load_pretrained(model, str(bogus), "alexnet")


def test_lr_schedule_shapes():
    total, warm = 100, 10
    cos = [engine.lr_factor(s, total, warm, "cosine") for s in range(total)]
    assert cos[0] == pytest.approx(0.1) and cos[9] == pytest.approx(1.0)
    assert cos[-1] < 0.01 and all(a >= b for a, b in zip(cos[10:], cos[11:], strict=False))
    assert engine.lr_factor(50, total, warm, "constant") == 1.0
    assert engine.lr_factor(99, total, warm, "linear") < 0.02


def test_no_weight_decay_on_norms_and_biases():
    from visionflow.model.zoo import create_model

    model = create_model("resnet18", 10, 32)
    groups = engine.param_groups(model, TrainConfig(weight_decay=0.1), backbone=set())
    for g in groups:
        if g["weight_decay"] > 0:
            assert all(p.ndim > 1 for p in g["params"])
        else:
            assert all(p.ndim <= 1 for p in g["params"])


@pytest.mark.slow
def test_ddp_two_gloo_processes_with_a_frozen_backbone(small, tmp_path):
    """torchrun, 2 gloo ranks, pretrained backbone frozen for epoch 1 then trained: the
    freeze must not change what DDP reduces (it used to flip requires_grad after the wrap,
    which failed at the second step); one set of outputs, rank 0 alone logs; the stop flag
    is broadcast every epoch (CPU tensor on gloo, CUDA tensor on NCCL)."""
    src = _small(small, tmp_path / "src", **{"train.epochs": 1})
    run_stage("train", load_params(src.params), src)
    pretrained = _weights(src)
    lay = _small(small, tmp_path / "ddp", **{
        "train.epochs": 2, "train.threads": 1, "train.pretrained": str(src.model),
        "train.freeze_epochs": 1, "train.early_stop_patience": 5})
    proc = run([str(BIN / "torchrun"), f"--log-dir={tmp_path / 'torchrun'}", "--standalone",
                "--nproc_per_node=2", "-m", "visionflow.cli.main", "stage", "train"], lay.root,
               check=False, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for rank in (0, 1):  # DDP kept the replicas in step
        assert f"rank {rank}: weights agree across 2 ranks" in proc.stdout, proc.stdout[-2000:]
    model, arch = load_classifier(lay.model)
    assert arch.num_classes == 10
    history = lay.history.read_text().splitlines()
    assert len(history) == 1 + 2  # header + two epochs
    tuned = _weights(lay)
    assert not torch.equal(tuned["net.layers.1.0.weight"], pretrained["net.layers.1.0.weight"])
    run_id = json.loads(lay.run_info.read_text())["run_id"]

    from mlflow import MlflowClient

    from visionflow.mlops import tracking

    exp_id = tracking.setup(lay)
    runs = MlflowClient().search_runs([exp_id])
    assert [r.info.run_id for r in runs] == [run_id]  # only rank 0 logged
    assert runs[0].data.tags["world_size"] == "2"


@pytest.mark.slow
@pytest.mark.timeout(300)  # a rank left waiting on a collective the other skipped
def test_two_ranks_stop_together_on_a_loss_that_is_not_a_number(small, tmp_path):
    """lr 1e30 on 2 gloo ranks: rank 0's word on the loss reaches both, both exit, the one
    line names the key, nothing is written."""
    lay = _small(small, tmp_path / "ddpnan", **{"train.model": "alexnet", "train.lr": 1e30,
                                                 "train.epochs": 2, "train.threads": 1,
                                                 "train.procs_per_node": 2})
    proc = run([str(BIN / "vflow"), "stage", "train", "--root", str(lay.root)], lay.root,
               check=False, timeout=280)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "the loss is not a number in epoch 1" in proc.stdout + proc.stderr, (
        proc.stdout[-2000:] + proc.stderr[-2000:])
    assert not lay.model.exists() and not lay.checkpoint.exists()


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("victim", ["stage", "torchrun"])
def test_a_killed_stage_or_torchrun_takes_its_ranks_along(small, tmp_path, victim):
    """SIGKILL the train stage (the OOM killer, a worker stopped hard): the kernel sends
    torchrun a SIGTERM and it stops its ranks; SIGKILL torchrun: the ranks get a SIGKILL, and
    the stage says so in one line. Both left the two ranks training on into the outputs,
    beside whatever ran the stage again."""
    import contextlib
    import subprocess
    import time

    import psutil

    lay = _small(small, tmp_path / victim, **{
        "train.model": "alexnet", "train.epochs": 500, "train.threads": 1,
        "train.procs_per_node": 2, "train.checkpoint_steps": 1})
    proc = subprocess.Popen([str(BIN / "vflow"), "stage", "train", "--root", str(lay.root)],
                            cwd=lay.root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    torchrun, ranks = [], []
    try:
        deadline = time.monotonic() + 240
        while not lay.checkpoint.is_file():  # both ranks are past their start-up
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.1)
        torchrun = psutil.Process(proc.pid).children()
        assert len(torchrun) == 1 and "torchrun" in torchrun[0].cmdline()[1]
        ranks = torchrun[0].children()
        assert len(ranks) == 2 and all("visionflow.stages.train" in r.cmdline() for r in ranks)
        (proc if victim == "stage" else torchrun[0]).kill()
        _, alive = psutil.wait_procs(torchrun + ranks, timeout=20)  # (500 epochs: minutes)
        assert not alive, [p.cmdline() for p in alive]
        out = proc.communicate(timeout=60)[0]
        if victim == "torchrun":
            assert "torchrun train was killed by SIGKILL; its ranks stopped with it" in out, out
    finally:
        for p in [proc, *torchrun, *ranks]:
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                p.kill()
