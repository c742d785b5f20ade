"""Pretrained weights really land in the model (issue #21): torchvision's checkpoints (written
here from torchvision's own models into torch.hub's cache, so nothing is downloaded; DenseNet's
in the old `norm.1` naming torchvision publishes) and a local weights file. Every tensor of the
file that fits the model must equal the model's afterwards; the head and a changed stem stay
fresh."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torchvision

from visionflow.model.classifier import Arch, build_classifier
from visionflow.model.pretrained import load_pretrained, torchvision_weights

# torchvision's DenseNet loader undoes this renaming; its published checkpoints have it
_OLD_DENSE = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))((?:[12])\.(?:weight|bias|"
                        r"running_mean|running_var))$")


def _random_state(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The model's state dict with every value random: a fresh init (BatchNorm's ones and
    zeros) cannot pass for a copied tensor."""
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=g) if v.is_floating_point()
                else torch.full_like(v, 7)) for k, v in model.state_dict().items()}


def _hub_checkpoint(torch_home: Path, name: str, state: dict[str, torch.Tensor]) -> None:
    """Put `state` where torch.hub looks before downloading torchvision's DEFAULT weights."""
    url = torchvision_weights(name, "DEFAULT").url
    ckpts = torch_home / "hub" / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    torch.save(state, ckpts / url.rsplit("/", 1)[-1])


def _assert_copied(model, state: dict[str, torch.Tensor], fresh: set[str],
                   loaded: set[str]) -> None:
    own = model.state_dict()
    expect = {k for k in own if k not in fresh | {"mean", "std"}}
    assert expect <= set(state), sorted(expect - set(state))[:5]
    differ = [k for k in sorted(expect) if not torch.equal(own[k], state[k])]
    assert not differ, f"{len(differ)} tensors not copied, e.g. {differ[:3]}"
    for k in fresh:  # the new head, a changed stem: untouched
        assert own[k].shape != state[k].shape or not torch.equal(own[k], state[k]), k
    params = {n for n, _ in model.named_parameters()}
    assert loaded == expect & params


@pytest.fixture
def torch_home(tmp_path, monkeypatch, no_network) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # a download would fail at once
    return tmp_path / "torch"


def test_torchvision_resnet18_weights_are_copied(torch_home):
    """224 px: torchvision's stem too; 5 classes: a new head."""
    state = _random_state(torchvision.models.resnet18(), seed=1)
    _hub_checkpoint(torch_home, "resnet18", state)
    model = build_classifier(Arch("resnet18", 5, 224))
    loaded = load_pretrained(model, "torchvision:DEFAULT", "resnet18")
    net = {f"net.{k}": v for k, v in state.items()}
    _assert_copied(model, net, {"net.fc.weight", "net.fc.bias"}, loaded)
    assert "net.conv1.weight" in loaded and "net.layer4.1.bn2.weight" in loaded


def test_torchvision_densenet121_weights_in_the_old_names_are_copied(torch_home):
    """32 px: the small-image stem (3x3 conv0) stays fresh; every dense layer's norm1/norm2,
    published as `norm.1`/`norm.2`, is copied."""
    state = _random_state(torchvision.models.densenet121(), seed=2)
    published = {_OLD_DENSE.sub(r"\1.\2", k): v for k, v in state.items()}
    assert "features.denseblock1.denselayer1.norm.1.weight" in published
    _hub_checkpoint(torch_home, "densenet121", published)
    model = build_classifier(Arch("densenet121", 10, 32))
    loaded = load_pretrained(model, "torchvision:DEFAULT", "densenet121")
    net = {f"net.{k}": v for k, v in state.items()}
    fresh = {"net.features.conv0.weight", "net.classifier.weight", "net.classifier.bias"}
    _assert_copied(model, net, fresh, loaded)
    assert "net.features.denseblock4.denselayer16.norm2.weight" in loaded


def test_a_local_weights_file_is_copied(tmp_path):
    """A saved state dict (the classifier's own names), 3 classes then 4: all but the head."""
    source = build_classifier(Arch("resnet18", 3, 32))
    state = _random_state(source, seed=3)
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": state}, path)
    model = build_classifier(Arch("resnet18", 4, 32))
    loaded = load_pretrained(model, str(path), "resnet18")
    _assert_copied(model, state, {"net.fc.weight", "net.fc.bias"}, loaded)


def test_a_torchvision_models_own_state_dict_in_a_file_is_copied(tmp_path):
    """Offline transfer learning: `torchvision.models.resnet18(weights=...).state_dict()`
    saved on a machine with a network, then `train.pretrained: that file`. Its names are
    torchvision's (`conv1.weight`, no `net.`); 96 px keeps torchvision's stem."""
    state = _random_state(torchvision.models.resnet18(), seed=4)
    path = tmp_path / "resnet18-imagenet.pt"
    torch.save(state, path)
    model = build_classifier(Arch("resnet18", 3, 96))
    loaded = load_pretrained(model, str(path), "resnet18")
    net = {f"net.{k}": v for k, v in state.items()}
    _assert_copied(model, net, {"net.fc.weight", "net.fc.bias"}, loaded)
