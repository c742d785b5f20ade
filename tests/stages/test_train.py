"""The training engine on CPU: resume equivalence, EMA, transfer learning, schedules, DDP."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import BIN, make_project, run, write_params

from visionflow.config import TrainConfig
from visionflow.configfile import load_params
from visionflow.layout import Layout
from visionflow.model import engine
from visionflow.model.classifier import load_classifier
from visionflow.pipeline.stages import run_stage
from visionflow.stages import train


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, digits_dir) -> Path:
    """A project whose validate + augment stages have run (the train inputs)."""
    root = make_project(tmp_path_factory.mktemp("train") / "base", digits_dir)
    layout = Layout.at(root)
    params = load_params(layout.params)
    for name in ("validate", "augment"):
        run_stage(name, params, layout)
    return root


def _copy(prepared: Path, dest: Path, **overrides) -> Layout:
    shutil.copytree(prepared, dest)
    from conftest import TINY

    write_params(dest / "params.yaml", {**TINY, "train.progress": False, **overrides})
    return Layout.at(dest)


def _weights(layout: Layout) -> dict[str, torch.Tensor]:
    return torch.load(layout.model, weights_only=True)["state_dict"]


def test_resume_equals_uninterrupted(prepared, tmp_path, monkeypatch):
    full = _copy(prepared, tmp_path / "full", **{"train.epochs": 2})
    run_stage("train", load_params(full.params), full)

    cut = _copy(prepared, tmp_path / "cut", **{"train.epochs": 2})
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


def test_checkpoint_for_other_params_is_ignored(prepared, tmp_path):
    lay = _copy(prepared, tmp_path / "p", **{"train.epochs": 1})
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
    ema.update_parameters(model)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update_parameters(model)
    # first update copies, the second blends: 0.9 * (w0 + 1) + 0.1 * (w0 + 2)
    torch.testing.assert_close(ema.module.weight, w0 + 1.1)


def test_ema_model_is_what_gets_saved(prepared, tmp_path):
    lay = _copy(prepared, tmp_path / "ema", **{"train.epochs": 1, "train.ema_decay": 0.5})
    run_stage("train", load_params(lay.params), lay)
    model, arch = load_classifier(lay.model)
    assert arch.num_classes == 10
    assert sum(p.abs().sum() for p in model.parameters()) > 0


def test_transfer_learning_from_saved_weights(prepared, tmp_path):
    src = _copy(prepared, tmp_path / "src", **{"train.epochs": 1, "train.model": "resnet18"})
    run_stage("train", load_params(src.params), src)
    pretrained = _weights(src)

    # Fine-tune on 10 classes with the backbone frozen the whole time: backbone unchanged,
    # head trained from scratch.
    dst = _copy(prepared, tmp_path / "dst", **{
        "train.epochs": 1, "train.model": "resnet18", "train.pretrained": str(src.model),
        "train.freeze_epochs": 1})
    run_stage("train", load_params(dst.params), dst)
    tuned = _weights(dst)
    conv = "net.layer1.0.conv1.weight"
    torch.testing.assert_close(tuned[conv], pretrained[conv])
    assert not torch.equal(tuned["net.fc.weight"], pretrained["net.fc.weight"])


def test_pretrained_with_no_matching_tensor_fails(tmp_path):
    from visionflow.errors import ConfigError
    from visionflow.model.classifier import Arch, build_classifier

    bogus = tmp_path / "w.pt"
    torch.save({"state_dict": {"nothing": torch.zeros(1)}}, bogus)
    model = build_classifier(Arch("alexnet", 10, 16))
    with pytest.raises(ConfigError, match="no tensor matches"):
        train.load_pretrained(model, str(bogus))


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
def test_ddp_two_gloo_processes_write_one_set_of_outputs(prepared, tmp_path):
    lay = _copy(prepared, tmp_path / "ddp", **{"train.epochs": 1, "train.threads": 1})
    proc = run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2",
                "-m", "visionflow.cli.main", "stage", "train"], lay.root, check=False, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    model, arch = load_classifier(lay.model)
    assert arch.num_classes == 10
    history = lay.history.read_text().splitlines()
    assert len(history) == 2  # header + one epoch
    run_id = json.loads(lay.run_info.read_text())["run_id"]

    from mlflow import MlflowClient

    from visionflow.mlops import tracking

    tracking.setup(lay)
    runs = MlflowClient().search_runs([tracking.setup(lay)])
    assert [r.info.run_id for r in runs] == [run_id]  # only rank 0 logged
    assert runs[0].data.tags["world_size"] == "2"
