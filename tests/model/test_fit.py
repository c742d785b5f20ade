"""The shared `fit` loop: callbacks, resume, EMA/lookahead, whitening, flips, freezing, TTA.

Tiny synthetic data and a narrow `fast` net: each test takes a second or two on one core.
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from helpers import torch_threads
from torch import nn

from visionflow.core.config import TrainConfig
from visionflow.model import engine
from visionflow.model.augment_ops import Policy
from visionflow.model.classifier import Arch, Classifier, build_classifier
from visionflow.model.fit import EpochEnd, FitRun, Recipe, fit
from visionflow.model.inference import device_logits, model_logits
from visionflow.model.zoo import FastNet

NO_AUG = Policy()
SMALL = {"widths": (8, 16, 16)}


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def _data(n: int = 256, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes: a bright left half or a bright right half, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randint(0, 80, (n, 3, size, size), generator=g, dtype=torch.uint8)
    half = size // 2
    for c in (0, 1):
        sel = y == c
        if c == 0:
            x[sel, :, :, :half] += 150
        else:
            x[sel, :, :, half:] += 150
    return x, y


def _fast(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(FastNet(2, 3, **SMALL), [0.3] * 3, [0.25] * 3)


def _recipe(**kw) -> Recipe:
    base = {"epochs": 2, "batch_size": 32, "lr": 0.2, "label_smoothing": 0.0,
            "warmup_epochs": 0.5, "channels_last": False, "schedule": "cosine"}
    return Recipe.from_params(TrainConfig(), **{**base, **kw})


def test_fit_learns_and_calls_back_every_epoch():
    x, y = _data()
    seen: list[EpochEnd] = []

    def cb(e: EpochEnd) -> None:
        e.metrics["val_top1"] = float(
            (device_logits(e.model, x).argmax(1) == y).float().mean())
        seen.append(e)

    result = fit(_fast(), x, y, _recipe(epochs=3), NO_AUG, num_classes=2, device="cpu",
                 callbacks=[cb])
    assert [e.epoch for e in seen] == [1, 2, 3] and seen[-1].step == 3 * (256 // 32)
    assert result.epochs_run == 3 and result.train_seconds > 0 and result.images == 3 * 256
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    assert result.history[-1]["val_top1"] == seen[-1].metrics["val_top1"] > 0.9
    assert seen[-1].train_seconds == pytest.approx(sum(e.seconds for e in seen))


def test_a_callback_returning_true_stops_after_that_epoch():
    x, y = _data(64)
    result = fit(_fast(), x, y, _recipe(epochs=5), NO_AUG, num_classes=2, device="cpu",
                 callbacks=[lambda e: e.epoch == 2])
    assert result.epochs_run == 2 and len(result.history) == 2


def test_fractional_epochs_stop_at_the_step_count():
    x, y = _data(128)
    result = fit(_fast(), x, y, _recipe(epochs=1.5), NO_AUG, num_classes=2, device="cpu")
    assert result.steps == 6 and result.epochs_run == 2


def test_resume_from_state_dict_equals_uninterrupted():
    torch.use_deterministic_algorithms(True)
    try:
        x, y = _data(128)
        recipe = _recipe(epochs=3, ema_decay=0.9, ema_every=2)
        policy = Policy(hflip=0.5, translate=2, cutout=4, cutout_p=0.5, alternate_flip=True)
        full = fit(_fast(), x, y, recipe, policy, num_classes=2, device="cpu", seed=3).model

        saved = io.BytesIO()

        def stop_and_save(e: EpochEnd) -> bool:
            torch.save(e.run.state_dict(), saved)
            return True

        fit(_fast(), x, y, recipe, policy, num_classes=2, device="cpu", seed=3,
            callbacks=[stop_and_save])
        saved.seek(0)
        run = FitRun(_fast(), x, y, recipe, policy, num_classes=2, device="cpu", seed=3)
        run.load_state_dict(torch.load(saved, weights_only=True))
        assert run.epoch == 1
        resumed = run.run().model
    finally:
        torch.use_deterministic_algorithms(False)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values(),
                         strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def test_ema_model_is_the_result_and_differs_from_the_raw_weights():
    x, y = _data(128)
    run = FitRun(_fast(), x, y, _recipe(ema_decay=0.9), NO_AUG, num_classes=2, device="cpu")
    result = run.run()
    assert result.model is run.ema.module
    raw, avg = run.model.state_dict(), result.model.state_dict()
    assert not torch.equal(raw["net.head.weight"], avg["net.head.weight"])


def test_lookahead_leaves_the_average_in_the_model():
    x, y = _data(128)
    recipe = _recipe(ema_decay=0.95, ema_every=3, ema_ramp=3.0, lookahead=True)
    run = FitRun(_fast(), x, y, recipe, NO_AUG, num_classes=2, device="cpu")
    result = run.run()
    assert result.model is run.model
    for k, v in run.ema.module.state_dict().items():
        if v.is_floating_point():  # weights and BN statistics
            torch.testing.assert_close(run.model.state_dict()[k], v, rtol=0, atol=0, msg=k)


def test_ema_follows_a_ramped_decay():
    model = nn.Linear(2, 1, bias=False)
    ema = engine.EMA(model, decay=0.5, every=2, ramp=1.0)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(1, 4)  # not an update step
    assert ema.updates == 0
    ema.update(2, 4)  # the first update copies
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(4, 4)  # decay 0.5**2 * (4/4)**1 = 0.25: 0.25 * 1 + 0.75 * 3
    torch.testing.assert_close(ema.module.weight, torch.full((1, 2), 2.5))


@pytest.mark.parametrize("bias_epochs", [None, 1])
def test_whitening_is_set_in_fit_and_its_bias_freezes(bias_epochs):
    x, y = _data(128)
    model = _fast()
    w0 = model.net.whiten.weight.detach().clone()
    biases: list[torch.Tensor] = []
    run = FitRun(model, x, y, _recipe(epochs=3, whiten_bias_epochs=bias_epochs), NO_AUG,
                 num_classes=2, device="cpu")
    run.run([lambda e: biases.append(e.run.model.net.whiten.bias.detach().clone())])
    assert not model.net.whiten.weight.requires_grad
    assert not torch.equal(model.net.whiten.weight, w0)  # set from the data
    if bias_epochs is None:
        assert not torch.equal(biases[1], biases[2])
    else:  # trained in epoch 1 only
        torch.testing.assert_close(biases[0], biases[2], rtol=0, atol=0)


def test_alternating_flip_mirrors_every_image_on_odd_epochs():
    x, y = _data(64)
    run = FitRun(_fast(), x, y, _recipe(), Policy(hflip=0.5, alternate_flip=True),
                 num_classes=2, device="cpu")
    idx = torch.arange(64)
    even, _, _ = run._batch(idx)
    run.epoch = 1
    odd, _, _ = run._batch(idx)
    torch.testing.assert_close(odd, even.flip(-1))
    plain = x.float() / 255
    flipped = (even - plain).abs().flatten(1).amax(1) > 1e-3
    assert 16 < int(flipped.sum()) < 48  # about half start mirrored


def test_frozen_backbone_is_unchanged_then_trains():
    x, y = _data(128)
    model = _fast()
    backbone = {n for n, p in model.named_parameters() if n.startswith("net.layers.0.")}
    start = {n: p.detach().clone() for n, p in model.named_parameters() if n in backbone}
    after: list[dict[str, torch.Tensor]] = []
    run = FitRun(model, x, y, _recipe(freeze_epochs=1), NO_AUG, num_classes=2,
                 device="cpu", backbone=backbone, whiten=False)
    run.run([lambda e: after.append({n: p.detach().clone()
                                     for n, p in e.run.model.named_parameters()
                                     if n in backbone})])
    trainable = [n for n in backbone if model.get_parameter(n).requires_grad]
    assert trainable
    for n in trainable:
        torch.testing.assert_close(after[0][n], start[n], rtol=0, atol=0, msg=n)
    assert any(not torch.equal(after[1][n], start[n]) for n in trainable)


def test_label_smoothing_is_the_loss_that_is_minimised():
    x, y = _data(64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 2))
    with torch.no_grad():
        expected = {s: float(F.cross_entropy(model(x.float() / 255), y, label_smoothing=s))
                    for s in (0.0, 0.4)}
    for s in (0.0, 0.4):
        result = fit(model, x, y, _recipe(epochs=1, lr=1e-12, label_smoothing=s,
                                          momentum=0.0), NO_AUG, num_classes=2, device="cpu")
        assert result.history[0]["train_loss"] == pytest.approx(expected[s], rel=1e-4)
    assert expected[0.4] != pytest.approx(expected[0.0], rel=1e-2)


def test_recipe_takes_every_train_key_it_names():
    cfg = TrainConfig(epochs=7, lr=0.3, label_smoothing=0.25, ema_decay=0.9, ema_every=5,
                      lookahead=True, bias_lr_scale=64, decay_biases=True, lr_end=0.07,
                      warmup_start=0.2, whiten_bias_epochs=3, freeze_epochs=2)
    r = Recipe.from_params(cfg)
    for name in Recipe.__dataclass_fields__:
        if name in TrainConfig.model_fields:
            assert getattr(r, name) == getattr(cfg, name), name
    assert Recipe.from_params(cfg.model_dump()) == r


def test_bias_lr_scale_and_decay_per_step():
    model = build_classifier(Arch("fast", 10, 16))
    r = _recipe(lr=2.0, weight_decay=0.01, bias_lr_scale=64, decay_biases=True)
    groups = engine.param_groups(model, r, backbone=set())
    bn_bias = model.net.layers[0][2].bias
    for g in groups:
        assert g["lr"] * g["weight_decay"] == pytest.approx(2.0 * 0.01)  # same decay per step
        if any(p is bn_bias for p in g["params"]):
            assert g["lr"] == 128.0
    frozen = model.net.layers[0][2].weight
    assert not any(p is frozen for g in groups for p in g["params"])


def test_lr_schedule_warm_up_from_start_and_decay_to_end():
    f = [engine.lr_factor(s, 100, 20, "linear", start=0.2, end=0.07) for s in range(100)]
    assert f[0] == pytest.approx(0.24) and f[19] == pytest.approx(1.0)
    assert f[-1] == pytest.approx(0.07, abs=0.015) and min(f[20:]) >= 0.07
    assert engine.lr_factor(100, 100, 20, "linear", start=0.2, end=0.07) == pytest.approx(0.07)


@pytest.mark.parametrize("level", [0, 1, 2])
def test_tta_levels(level):
    x, _ = _data(40)
    model = _fast().eval()
    out = model_logits(model, x, 16, "cpu", tta=level)
    assert out.shape == (40, 2) and out.device.type == "cpu"
    probs = [model(v.float() / 255).softmax(1) for v in (x, x.flip(-1))]
    if level == 0:
        torch.testing.assert_close(out, model(x.float() / 255))
    elif level == 1:
        torch.testing.assert_close(out.exp(), (probs[0] + probs[1]) / 2)
    else:
        xf = F.pad(x.float() / 255, (1, 1, 1, 1), mode="reflect")
        shifts = [xf[..., :16, :16], xf[..., 2:, 2:]]
        more = [model(s).softmax(1) for v in shifts for s in (v, v.flip(-1))]
        expect = (probs[0] + probs[1]) / 4 + sum(more) / 8
        torch.testing.assert_close(out.exp(), expect)
    assert model_logits(model, x, 16, "cpu", tta=True).equal(model_logits(model, x, 16, "cpu",
                                                                           tta=1))


def test_collectives_use_cuda_tensors_on_nccl():
    dev = torch.device("cuda", 0)
    assert engine.collective_device("nccl", dev) == dev
    assert engine.collective_device("gloo", dev).type == "cpu"
    assert engine.collective_device("gloo", torch.device("cpu")).type == "cpu"


def test_dirac_init_is_part_of_the_recipe():
    x, y = _data(64)
    starts: list[torch.Tensor] = []
    model = _fast()
    conv = model.net.layers[1][4]  # a 16 -> 16 3x3 conv: all identities after Dirac
    run = FitRun(model, x, y, _recipe(epochs=1, lr=1e-12, momentum=0.0, dirac_init=True),
                 NO_AUG, num_classes=2, device="cpu")
    run.run([lambda e: starts.append(conv.weight.detach().clone())])
    eye = torch.zeros_like(conv.weight)
    torch.nn.init.dirac_(eye)
    torch.testing.assert_close(starts[0], eye, atol=1e-6, rtol=0)
    assert not torch.equal(_fast().net.layers[1][4].weight, eye)  # off by default
