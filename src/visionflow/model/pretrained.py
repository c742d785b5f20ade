"""Transfer learning: copy matching tensors from local weights or torchvision's weights.

`train.pretrained` is a weights file (a state dict, or a saved classifier) or
`torchvision:<WEIGHTS>` (e.g. `torchvision:DEFAULT`): torchvision's weights for the zoo
model of the same name (resnet18 -> ResNet18_Weights), downloaded once (online only).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torchvision
from torch import nn

from visionflow.core.errors import ConfigError

TORCHVISION_PREFIX = "torchvision:"
# zoo models whose layers are torchvision's own (the small-image stem aside)
TORCHVISION_NAMES = ("resnet18", "resnet34", "resnet50", "densenet121")
# torchvision's DenseNet checkpoints name layers 'norm.1'; the modules are 'norm1'
_DENSE_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def torchvision_weights(model_name: str, weights: str) -> torchvision.models.WeightsEnum:
    """The torchvision weights enum member for a zoo model (no download)."""
    key = f"train.pretrained='{TORCHVISION_PREFIX}{weights}'"
    if model_name not in TORCHVISION_NAMES:
        raise ConfigError(f"{key}: model '{model_name}' has no torchvision weights (choose "
                          f"one of {', '.join(TORCHVISION_NAMES)})")
    enum = torchvision.models.get_model_weights(model_name)
    if weights not in enum.__members__:
        raise ConfigError(f"{key}: unknown weights for {model_name}, choose one of "
                          f"{', '.join(enum.__members__)}")
    return enum[weights]


def _download(model_name: str, weights: str) -> dict[str, torch.Tensor]:
    member = torchvision_weights(model_name, weights)
    try:
        state = member.get_state_dict(progress=False)
    except Exception as err:  # offline, proxy, disk: one line, no traceback
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"train.pretrained='{TORCHVISION_PREFIX}{weights}': cannot download "
                          f"{member.url} ({reason})") from None
    return _as_classifier_keys(state)


def _as_classifier_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A torchvision model's state dict in the zoo classifier's names (`net.` + torchvision's
    module names; DenseNet's published `norm.1` as its modules' `norm1`)."""
    return {"net." + _DENSE_KEY.sub(r"\1\2", k): v for k, v in state.items()}


def load_pretrained(model: nn.Module, spec: str, model_name: str) -> set[str]:
    """Copy matching tensors into `model` (a Classifier); returns the names of the parameters
    loaded (the backbone). The rest (the new head, a changed stem) start fresh."""
    if spec.startswith(TORCHVISION_PREFIX):
        state = _download(model_name, spec[len(TORCHVISION_PREFIX):])
    else:
        if not Path(spec).is_file():
            raise ConfigError(f"train.pretrained={spec!r}: file not found")
        blob = torch.load(spec, map_location="cpu", weights_only=True)
        state = blob.get("state_dict", blob) if isinstance(blob, dict) else {}
        if state and not any(k.startswith("net.") for k in state):  # torchvision's own
            state = _as_classifier_keys(state)  # (`model.state_dict()` saved to a file)
    own = model.state_dict()
    fresh = {"mean", "std", *_head_keys(model)}  # new data's normalisation, a new head
    matched = {k: v for k, v in state.items()
               if k in own and own[k].shape == v.shape and k not in fresh}
    if not matched:
        theirs, ours = next(iter(state), "-"), next(k for k in own if k not in fresh)
        raise ConfigError(f"train.pretrained={spec!r}: no tensor matches the model (its "
                          f"names look like {theirs!r}, the model's like {ours!r})")
    model.load_state_dict(matched, strict=False)
    return {n for n, _ in model.named_parameters() if n in matched}


def _head_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the final Linear layer: the head that transfer learning replaces."""
    last = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    return [f"{last}.weight", f"{last}.bias"]
