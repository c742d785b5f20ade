"""CUDA-only checks of the training loop and device evaluation (`pytest -m gpu`).

Imports torch-only modules alone, so `bench/gpu_bench.sh` runs this file on the GPU machine,
which has no pydantic or MLflow.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from visionflow.model.augment_ops import Policy
from visionflow.model.classifier import Classifier
from visionflow.model.fit import FitRun, Recipe
from visionflow.model.inference import device_logits, model_logits
from visionflow.model.zoo import FastNet, create_model

# params.yaml's train section (= TrainConfig's defaults; no pydantic on the GPU machine)
TRAIN = yaml.safe_load(
    (Path(__file__).resolve().parents[2] / "params.yaml").read_text())["train"]

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _data(n: int, size: int = 32, device: str = "cuda"):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (n,), generator=g)
    x = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    x[torch.arange(n), y % 3] //= 3  # a learnable colour cue
    return x.to(device), y.to(device)


def _model() -> Classifier:
    torch.manual_seed(0)
    return Classifier(FastNet(10, 3, widths=(32, 64, 64)), [0.5] * 3, [0.25] * 3)


def _recipe(**kw) -> Recipe:
    return Recipe.from_params(
        TRAIN, **{"epochs": 2, "batch_size": 128, "lr": 0.2, "warmup_epochs": 0.5,
                          "ema_decay": 0.9, "ema_every": 2, "label_smoothing": 0.0,
                          "schedule": "cosine", **kw})


def test_training_steps_never_sync_the_host():
    x, y = _data(1024)
    policy = Policy(hflip=0.5, translate=2, cutout=4, cutout_p=0.5, brightness=0.2,
                    mixup_alpha=0.2, mix_p=0.5, alternate_flip=True)
    run = FitRun(_model(), x, y, _recipe(grad_clip=5.0), policy, num_classes=10,
                 device="cuda")
    run._epoch(None, 0.0)  # warm-up: cuDNN autotuning and lazy inits may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss_sum, correct, seen = run._epoch(None, 0.0)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert seen == 1024 and float(loss_sum) > 0


def test_bf16_fit_learns_and_evaluates_on_the_device():
    x, y = _data(2048)
    run = FitRun(_model(), x, y, _recipe(epochs=4, lookahead=True, ema_decay=0.95,
                                         ema_every=5, ema_ramp=3.0, whiten_bias_epochs=1),
                 Policy(hflip=0.5, alternate_flip=True, translate=2), num_classes=10,
                 device="cuda")
    assert torch.backends.cudnn.benchmark
    result = run.run()
    logits = device_logits(result.model, x, 512, tta=2, amp=True)
    assert logits.device.type == "cuda" and logits.shape == (2048, 10)
    assert float((logits.argmax(1) == y).float().mean()) > 0.3


def test_compiled_fit_warms_up_outside_the_timed_window_and_keeps_the_weights():
    x, y = _data(1024)
    model = _model()
    run = FitRun(model, x, y, _recipe(epochs=1, compile=True), Policy(), num_classes=10,
                 device="cuda")
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    run._warm_up()
    for k, v in run.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert run.run().steps == 8


def test_muon_compiled_auto_learns_without_host_syncs():
    """`train.optimizer: muon` with `train.compile: auto` (issue #20): compiled on CUDA,
    `torch.optim.Muon` on the conv filters, no host sync in a training step."""
    x, y = _data(2048)
    recipe = _recipe(epochs=4, optimizer="muon", lr=1.66, momentum=0.85, bias_lr_scale=64.0,
                     weight_decay=0.0024, decay_biases=True, ema_decay=None,
                     label_smoothing=0.2, schedule="linear", warmup_epochs=0.0,
                     batch_size=256, compile="auto", dirac_init=True, whiten_bias_epochs=1)
    run = FitRun(_model(), x, y, recipe, Policy(hflip=0.5, alternate_flip=True, translate=2),
                 num_classes=10, device="cuda")
    assert run.compiled and type(run.optimizer.optimizers[1]).__name__ == "FilterMuon"
    run._warm_up()
    run._whiten()  # what `run` does first at step 0
    run._epoch(None, 0.0)  # lazy inits may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run._epoch(None, 0.0)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    run.epoch = 2
    result = run.run()
    logits = device_logits(result.model, x, 512, tta=1, amp=True)
    assert float((logits.argmax(1) == y).float().mean()) > 0.3


@pytest.mark.parametrize("level", [0, 1, 2])
def test_device_tta_matches_the_cpu(level):
    x, _ = _data(256, device="cpu")
    model = create_model("resnet18", 10, 32).eval()
    cpu = model_logits(model, x, 64, "cpu", tta=level)
    gpu = model_logits(model.cuda(), x, 64, "cuda", tta=level)
    assert gpu.device.type == "cpu"
    torch.testing.assert_close(gpu, cpu, rtol=2e-2, atol=2e-2)  # cuDNN convs run TF32


class _Section(dict):
    """A params section as a plain mapping with attribute access (no pydantic here)."""

    __getattr__ = dict.__getitem__


def test_a_tuning_trial_places_the_data_on_the_device_and_scores_there():
    """`model.trainer` (what each `vflow tune` trial and the train stage run): the images
    resident on the GPU, the fit on them, val top-1 in bf16 on the device."""
    from pathlib import Path

    import yaml

    from visionflow.model.trainer import prepare_fit, top1

    x, y = _data(1024, size=16, device="cpu")
    params = Path(__file__).resolve().parents[2] / "params.yaml"
    train = _Section(yaml.safe_load(params.read_text())["train"])
    train.update(epochs=3, batch_size=128, lr=0.2, warmup_epochs=0.5)
    torch.manual_seed(0)
    prepared = prepare_fit(x, y, [str(i) for i in range(10)], train,
                           Policy(translate=2), device=torch.device("cuda"), seed=0)
    assert not prepared.streaming and prepared.run.x.device.type == "cuda"
    scores = []
    result = prepared.run.run([lambda e: scores.append(top1(e.model, x[:256].cuda(),
                                                            y[:256].cuda())) or False])
    assert result.epochs_run == 3 and len(scores) == 3 and scores[-1] > 0.2, scores  # chance 0.1
