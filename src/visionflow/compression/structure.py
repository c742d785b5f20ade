"""Save and rebuild models whose layer shapes differ from their architecture's defaults.

Structured pruning shrinks conv/linear/BN layers; low-rank factorisation replaces a layer by a
small `nn.Sequential` of layers. Neither state dict loads into the original architecture, and
we never pickle module objects. So the checkpoint stores, next to the state dict, a plain-dict
*layer spec* of every Conv2d / Linear / BatchNorm layer (its constructor arguments); loading
builds the original architecture and swaps in layers built from the spec wherever they differ.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visionflow.core.files import torch_save
from visionflow.model.classifier import Arch, build_classifier

FORMAT = "visionflow-structure-v1"
LEAF_TYPES = (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d)
Builder = Callable[[dict[str, Any]], nn.Module]


def layer_spec(module: nn.Module) -> dict[str, Any]:
    """Constructor arguments of one Conv2d / Linear / BatchNorm layer, as plain values."""
    if isinstance(module, nn.Conv2d):
        return {
            "type": "Conv2d",
            "in_channels": module.in_channels,
            "out_channels": module.out_channels,
            "kernel_size": tuple(module.kernel_size),
            "stride": tuple(module.stride),
            "padding": module.padding if isinstance(module.padding, str) else tuple(module.padding),
            "dilation": tuple(module.dilation),
            "groups": module.groups,
            "bias": module.bias is not None,
            "padding_mode": module.padding_mode,
        }
    if isinstance(module, nn.Linear):
        return {
            "type": "Linear",
            "in_features": module.in_features,
            "out_features": module.out_features,
            "bias": module.bias is not None,
        }
    if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
        return {
            "type": type(module).__name__,
            "num_features": module.num_features,
            "eps": module.eps,
            "momentum": module.momentum,
            "affine": module.affine,
            "track_running_stats": module.track_running_stats,
        }
    raise TypeError(f"no layer spec for {type(module).__name__}")


def build_layer(spec: dict[str, Any]) -> nn.Module:
    kwargs = {k: v for k, v in spec.items() if k != "type"}
    cls = {
        "Conv2d": nn.Conv2d,
        "Linear": nn.Linear,
        "BatchNorm1d": nn.BatchNorm1d,
        "BatchNorm2d": nn.BatchNorm2d,
    }[spec["type"]]
    return cls(**kwargs)


def model_structure(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Layer spec of every Conv2d / Linear / BatchNorm in `model`, keyed by module name."""
    return {name: layer_spec(m) for name, m in model.named_modules() if isinstance(m, LEAF_TYPES)}


def _container(model: nn.Module, name: str) -> nn.Module:
    """The module at `name`, turned into an empty nn.Sequential if it is missing or a leaf layer
    (a factorised layer's parent in the compressed model)."""
    if not name:
        return model
    parent_name, _, child = name.rpartition(".")
    parent = _container(model, parent_name)
    current = parent._modules.get(child)
    if current is None or isinstance(current, LEAF_TYPES):
        current = nn.Sequential()
        parent.add_module(child, current)
    return current


def apply_structure(model: nn.Module, structure: dict[str, dict[str, Any]]) -> nn.Module:
    """Reshape `model` (in place) so its layers match `structure`; unchanged layers are kept."""
    current = model_structure(model)
    for name, spec in structure.items():
        if current.get(name) == spec:
            continue
        parent_name, _, child = name.rpartition(".")
        _container(model, parent_name).add_module(child, build_layer(spec))
    return model


def default_builder(arch: dict[str, Any]) -> nn.Module:
    """The project's classifier for an `Arch` dict (normalisation + zoo network)."""
    return build_classifier(Arch(**arch))


def save_structured(path: str | Path, model: nn.Module, arch: dict[str, Any], **extra: Any) -> None:
    """Write `{"arch", "state_dict", "structure", **extra}` atomically; tensors and plain
    values only, so it loads with `torch.load(weights_only=True)`."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    blob = {
        "arch": arch,
        "state_dict": state,
        "structure": {"format": FORMAT, "layers": model_structure(model)},
        **extra,
    }
    torch_save(blob, path)


def load_structured(path: str | Path, build: Builder | None = None) -> nn.Module:
    """Rebuild a model saved by `save_structured`: `build(arch)`, reshape, load weights (strict)."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    structure = blob.get("structure")
    if not structure or structure.get("format") != FORMAT:
        raise ValueError(f"{path}: not a structured checkpoint (no '{FORMAT}' layer spec)")
    model = (build or default_builder)(blob["arch"])
    apply_structure(model, structure["layers"])
    model.load_state_dict(blob["state_dict"], strict=True)
    return model.eval()
