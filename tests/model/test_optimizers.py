"""`train.optimizer: muon` (issue #20): Muon on the conv filters, Nesterov SGD for the rest;
`train.compile: auto`; the cifar10-muon preset. Tiny `fast` nets on the CPU, a second each."""

from __future__ import annotations

import pytest
import torch
from helpers import REPO, torch_threads

from visionflow.core.config import TrainConfig
from visionflow.core.configfile import parse_params
from visionflow.core.errors import ConfigError
from visionflow.core.presets import load_raw
from visionflow.model.augment_ops import Policy
from visionflow.model.classifier import Classifier
from visionflow.model.fit import FitRun, Recipe
from visionflow.model.optimizers import (
    FilterMuon,
    Optimizers,
    compile_on,
    make_optimizer,
    muon_filters,
)
from visionflow.model.zoo import FastNet

SMALL = {"widths": (8, 16, 16)}


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def _model() -> Classifier:
    return Classifier(FastNet(10, **SMALL), [0.5] * 3, [0.25] * 3)


def _recipe(**over) -> Recipe:
    base = {"optimizer": "muon", "lr": 1.66, "momentum": 0.85, "weight_decay": 0.0024,
            "decay_biases": True, "bias_lr_scale": 64.0, "batch_size": 32, "epochs": 1,
            "schedule": "linear", "whiten_bias_epochs": 3, "dirac_init": True}
    return Recipe.from_params(TrainConfig(), **(base | over))


def _names(model, params) -> list[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return sorted(by_id[id(p)] for p in params)


def test_muon_trains_the_conv_filters_and_sgd_the_head_and_biases():
    model = _model()  # whitening filters left trainable here (`fit` freezes them): still SGD's
    opt = make_optimizer(model, _recipe(), set())
    assert isinstance(opt, Optimizers)
    sgd, muon = opt.optimizers
    assert isinstance(sgd, torch.optim.SGD) and isinstance(muon, FilterMuon)
    assert isinstance(muon, torch.optim.Muon)
    convs = [n for n, p in model.named_parameters() if p.ndim == 4]
    filters = _names(model, [p for p, _ in muon.sources])
    assert filters == sorted(n for n in convs if ".whiten." not in n) and len(filters) == 6
    assert muon.param_groups[0]["lr"] == 0.24 and muon.param_groups[0]["momentum"] == 0.6
    assert all(v.ndim == 2 for g in muon.param_groups for v in g["params"])
    sgd_params = [p for g in sgd.param_groups for p in g["params"]]
    assert "net.head.weight" in _names(model, sgd_params)
    assert "net.whiten.weight" in _names(model, sgd_params)
    lrs = {n: g["lr"] for g in sgd.param_groups for n in _names(model, g["params"])}
    assert lrs["net.head.weight"] == 1.66
    assert lrs["net.whiten.bias"] == pytest.approx(1.66 * 64)  # at the norm-bias lr
    assert all(lrs[n] == pytest.approx(1.66 * 64) for n in lrs if n.endswith(".bias"))
    assert sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.85
    # the optimizers' own group dicts: one scheduler drives both
    assert all(any(g is h for o in opt.optimizers for h in o.param_groups)
               for g in opt.param_groups)


def test_muon_step_updates_the_conv_weight_in_place_and_normalises_it():
    model = _model().to(memory_format=torch.channels_last)
    conv = model.net.layers[1][0]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    opt = make_optimizer(model, _recipe(), set())
    x = torch.rand(8, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    before = conv.weight.detach().clone()
    model(x).square().mean().backward()
    opt.step()
    delta = conv.weight.detach() - before * (len(before) ** 0.5 / before.norm())
    assert delta.abs().max() > 1e-4  # Muon's step landed in the conv's own storage
    # an orthogonalised step: its singular values are of order one (not the gradient's scale)
    s = torch.linalg.svdvals(delta.permute(0, 2, 3, 1).reshape(len(delta), -1) / 0.24)
    assert 0.2 < s.max() < 2.0


def test_muon_rescales_each_filter_bank_to_norm_sqrt_out_before_its_step():
    model = _model()
    with torch.no_grad():
        for p in muon_filters(model):
            p.mul_(3.0)
    opt = make_optimizer(model, _recipe(muon_lr=1e-9), set())
    model(torch.rand(4, 3, 16, 16)).square().mean().backward()
    opt.step()
    for p in muon_filters(model):
        assert p.norm().item() == pytest.approx(len(p) ** 0.5, rel=1e-4)


def test_muon_optimizer_state_round_trips_for_a_resume():
    x = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)
    y = torch.randint(0, 10, (64,))
    run = FitRun(_model(), x, y, _recipe(epochs=2), Policy(), num_classes=10, device="cpu")
    run.run()
    state = run.optimizer.state_dict()
    assert len(state["optimizers"]) == 2 and state["optimizers"][1]["state"]
    again = FitRun(_model(), x, y, _recipe(epochs=2), Policy(), num_classes=10, device="cpu")
    again.optimizer.load_state_dict(state)
    assert [g["lr"] for g in again.optimizer.param_groups] == \
        [g["lr"] for g in run.optimizer.param_groups]
    assert all(any(g is h for o in again.optimizer.optimizers for h in o.param_groups)
               for g in again.optimizer.param_groups)


def test_unknown_optimizer_is_one_line_naming_the_choices():
    with pytest.raises(ConfigError) as err:
        make_optimizer(_model(), _recipe(optimizer="lion"), set())
    assert str(err.value) == ("train.optimizer: 'lion': unknown optimizer, choose one of "
                              "sgd, adamw, muon")
    with pytest.raises(ConfigError) as err:
        parse_params({"train": {"optimizer": "lion"}})
    assert "train.optimizer='lion'" in str(err.value) and "\n" not in str(err.value)


def test_compile_auto_means_cuda_only():
    assert compile_on("auto", torch.device("cuda")) and not compile_on("auto", "cpu")
    assert compile_on(True, "cpu") and not compile_on(False, torch.device("cuda"))
    assert parse_params({}).train.compile == "auto"
    assert parse_params({"train": {"compile": False}}).train.compile is False
    with pytest.raises(ConfigError, match="train.compile='sometimes'"):
        parse_params({"train": {"compile": "sometimes"}})


def test_the_muon_preset_loads_and_builds_its_optimizer():
    raw = load_raw(REPO / "params.yaml", "cifar10-muon")
    params = parse_params(raw)
    assert params.preset == "cifar10-muon" and params.train.optimizer == "muon"
    assert params.train.batch_size == 2000 and params.train.ema_decay is None
    assert params.train.warmup_epochs == 0 and params.train.lr_end == 0
    recipe = Recipe.from_params(params.train)
    assert recipe.optimizer == "muon" and recipe.compile == "auto"
    model = _model()
    assert len(muon_filters(model)) == 6
    assert isinstance(make_optimizer(model, recipe, set()), Optimizers)


def test_params_yaml_train_section_matches_the_config_defaults():
    from visionflow.core.config import TrainConfig
    from visionflow.core.configfile import read_params_file

    train = parse_params(read_params_file(REPO / "params.yaml")).train
    assert train == TrainConfig() and train.compile == "auto" and train.muon_lr == 0.24


@pytest.mark.parametrize("name", ["sgd", "adamw", "muon"])
def test_zero_grad_clears_every_trainable_parameter(name):
    model = _model()
    opt = make_optimizer(model, _recipe(optimizer=name), set())
    model(torch.rand(4, 3, 16, 16)).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    kept = [n for n, p in model.named_parameters() if p.grad is not None]
    assert kept == []  # Muon's filter banks included: else each step adds to the last


def test_muon_steps_follow_the_record_rule_on_each_steps_own_gradient():
    """Three steps through `make_optimizer` against the update rule of the public record,
    written out here: buf = m*buf + g; u = g + m*buf; bank to norm sqrt(out); bank -= lr*NS(u)."""
    from torch.optim._muon import _zeropower_via_newtonschulz as newton_schulz

    model = _model()
    ref = [p.detach().clone() for p in muon_filters(model)]
    opt = make_optimizer(model, _recipe(lr=0.0, muon_lr=0.1), set())  # only Muon moves
    bufs = [torch.zeros_like(p) for p in ref]
    x = torch.rand(8, 3, 16, 16)
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        loss = model(x).square().mean()
        grads = torch.autograd.grad(loss, muon_filters(model), retain_graph=True)
        loss.backward()
        opt.step()
        for w, b, g in zip(ref, bufs, grads, strict=True):
            b.mul_(0.6).add_(g)
            u = g + 0.6 * b
            w.mul_(len(w) ** 0.5 / w.norm())
            w.sub_(0.1 * newton_schulz(u.reshape(len(u), -1), (3.4445, -4.7750, 2.0315), 3,
                                       1e-7).float().view_as(w))
        for w, p in zip(ref, muon_filters(model), strict=True):
            assert (p.detach() - w).norm() / w.norm() < 1e-2  # bf16 Newton-Schulz: ~2e-3


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")  # no steps here
def test_muon_whitening_bias_lr_decays_to_zero_over_its_epochs_as_the_record():
    x = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)
    recipe = _recipe(epochs=4, whiten_bias_epochs=1, warmup_epochs=0.0)
    run = FitRun(_model(), x, torch.randint(0, 10, (64,)), recipe, Policy(), num_classes=10,
                 device="cpu")  # 2 steps an epoch, 8 in all
    groups = run.optimizer.param_groups
    wb = next(g for g in groups if g.get("whiten_bias"))
    head = next(g for g in groups if g is not wb and g["lr"] == pytest.approx(1.66))
    seen = []
    for _ in range(3):
        seen.append((wb["lr"], head["lr"]))
        run.scheduler.step()
    assert seen == [pytest.approx((1.66 * 64 * f, 1.66 * h)) for f, h in
                    [(1.0, 1.0), (0.5, 7 / 8), (0.0, 6 / 8)]]
