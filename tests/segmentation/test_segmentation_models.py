"""Segmentation models (#19): logits at the input's size for any H x W, the registry, and
transfer learning from local weights files (weights_only)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from visionflow.core.errors import ConfigError
from visionflow.data import segmentation_masks
from visionflow.model.classifier import Arch, build_classifier, save_classifier
from visionflow.model.segmentation import (
    IGNORE_INDEX,
    SegArch,
    UNet,
    build_segmenter,
    create_segmentation_model,
    list_segmentation_models,
    load_segmentation_weights,
    load_segmenter,
    save_segmenter,
)

TORCHVISION = ["deeplabv3_mobilenet_v3_large", "deeplabv3_resnet101", "deeplabv3_resnet50",
               "fcn_resnet101", "fcn_resnet50", "lraspp_mobilenet_v3_large"]


def test_zoo_names_and_ignore_index():
    assert list_segmentation_models() == sorted(["unet", *TORCHVISION])
    assert IGNORE_INDEX == segmentation_masks.IGNORE_INDEX == 255
    with pytest.raises(ValueError, match="unknown segmentation model 'segnet'"):
        create_segmentation_model("segnet", 3)


@pytest.mark.parametrize("hw", [(1, 1), (17, 23), (48, 96), (65, 33)])
def test_unet_any_size(hw):
    torch.manual_seed(0)
    model = build_segmenter(SegArch("unet", 5, kwargs={"width": 4, "depth": 4})).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, *hw))
    assert out.shape == (2, 5, *hw)


def test_unet_skip_connections_carry_position():
    """A pixel change moves the logits of that pixel's neighbourhood most (the full-resolution
    skip path); a U-Net without skips would smear it over the whole image."""
    torch.manual_seed(0)
    net = UNet(2, 1, width=4, depth=3).eval()
    x = torch.zeros(1, 1, 32, 32)
    with torch.no_grad():
        base = net(x)
        x[0, 0, 5, 5] = 10
        delta = (net(x) - base).abs().sum(1)[0]
    assert delta[3:8, 3:8].mean() > 5 * delta[20:, 20:].mean()


@pytest.mark.parametrize("name", ["fcn_resnet50", "deeplabv3_mobilenet_v3_large",
                                  "lraspp_mobilenet_v3_large"])
def test_torchvision_heads_output_at_input_size(name):
    model = build_segmenter(SegArch(name, 4)).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 37, 53)).shape == (1, 4, 37, 53)
    gray = build_segmenter(SegArch(name, 3, in_channels=1, mean=[0.5], std=[0.25])).eval()
    with torch.no_grad():
        assert gray(torch.rand(1, 1, 40, 40)).shape == (1, 3, 40, 40)


def test_weights_from_a_segmenter_all_but_a_new_head(tmp_path):
    torch.manual_seed(0)
    old = build_segmenter(SegArch("unet", 5, kwargs={"width": 4, "depth": 2}))
    torch.save({"state_dict": old.state_dict()}, tmp_path / "old.pt")
    new = build_segmenter(SegArch("unet", 3, kwargs={"width": 4, "depth": 2}))
    loaded = load_segmentation_weights(new, tmp_path / "old.pt")
    params = {n for n, _ in new.named_parameters()}
    assert loaded == params - {"net.head.weight", "net.head.bias"}
    assert torch.equal(new.net.stem[0].weight, old.net.stem[0].weight)


@pytest.mark.parametrize("seg, cls", [("fcn_resnet50", "resnet50"),
                                      ("lraspp_mobilenet_v3_large", "mobilenet_v3_large")])
def test_weights_from_a_classification_backbone(tmp_path, seg, cls):
    backbone = torchvision.models.get_model(cls, weights=None)
    torch.save(backbone.state_dict(), tmp_path / "backbone.pth")
    model = build_segmenter(SegArch(seg, 4))
    loaded = load_segmentation_weights(model, tmp_path / "backbone.pth")
    assert loaded and all(n.startswith("net.net.backbone.") for n in loaded)
    first = next(n for n in loaded if n.endswith("weight"))
    src = first.removeprefix("net.net.backbone.")
    src = src if src in backbone.state_dict() else f"features.{src}"
    assert torch.equal(model.state_dict()[first], backbone.state_dict()[src])


def test_save_load_roundtrip_and_task_check(tmp_path):
    torch.manual_seed(0)
    arch = SegArch("unet", 3, classes=["bg", "a", "b"], kwargs={"width": 4, "depth": 2})
    model = build_segmenter(arch).eval()
    save_segmenter(tmp_path / "seg.pt", model, arch)
    again, arch2 = load_segmenter(tmp_path / "seg.pt")
    x = torch.rand(1, 3, 21, 30)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    assert arch2 == arch
    cls_arch = Arch("fast", 3, 16)
    save_classifier(tmp_path / "cls.pt", build_classifier(cls_arch), cls_arch)
    with pytest.raises(ConfigError, match="a classification model, not a segmentation model"):
        load_segmenter(tmp_path / "cls.pt")


class _Evil:
    pass


def test_bad_weights_files_one_line(tmp_path):
    model = build_segmenter(SegArch("unet", 2, kwargs={"width": 4, "depth": 1}))
    with pytest.raises(ConfigError, match="file not found"):
        load_segmentation_weights(model, tmp_path / "missing.pt")
    torch.save({"obj": _Evil()}, tmp_path / "pickle.pt")  # not loadable with weights_only
    with pytest.raises(ConfigError, match="not a weights file") as err:
        load_segmentation_weights(model, tmp_path / "pickle.pt")
    assert "\n" not in str(err.value)
    torch.save({"other.weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="no tensor matches"):
        load_segmentation_weights(model, tmp_path / "other.pt")
    assert isinstance(model.net, nn.Module)
