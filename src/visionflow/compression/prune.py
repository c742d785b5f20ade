"""Pruning: unstructured magnitude sparsity (torch.nn.utils.prune) and structured channel
pruning (torch-pruning's dependency graph), plus saving/loading channel-pruned models.

Unstructured zeros keep every tensor's shape: no smaller file and no speed-up with dense
kernels. Structured pruning removes whole channels (coupled layers pruned together), so the
model really shrinks, but its state dict no longer fits the original architecture; use
`save_pruned` / `load_pruned`, which store each layer's shape.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.utils import prune

from visionflow.compression.structure import Builder, load_structured, save_structured

PRUNABLE = (nn.Conv2d, nn.Linear)


def weight_sparsity(model: nn.Module) -> float:
    """Fraction of exactly-zero entries over all conv/linear weights."""
    weights = [m.weight for m in model.modules() if isinstance(m, PRUNABLE)]
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / sum(w.numel() for w in weights)


def magnitude_prune(model: nn.Module, amount: float) -> tuple[nn.Module, float]:
    """Global L1 unstructured pruning of `amount` of all conv/linear weights (on a copy).

    The masks are folded in (`prune.remove`), so the state dict is plain and loads into the
    original architecture. Returns (pruned model, achieved weight sparsity).
    """
    if not 0.0 <= amount < 1.0:
        raise ValueError(f"prune amount must be in [0, 1), got {amount}")
    model = copy.deepcopy(model)
    params = [(m, "weight") for m in model.modules() if isinstance(m, PRUNABLE)]
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=amount)
    for module, name in params:
        prune.remove(module, name)
    return model, weight_sparsity(model)


def final_classifier(model: nn.Module) -> nn.Module:
    """The last nn.Linear (or else the last Conv2d) in module order: the output layer."""
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    layers = layers or [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not layers:
        raise ValueError("model has no Linear or Conv2d layer")
    return layers[-1]


def structured_prune(
    model: nn.Module,
    example: torch.Tensor,
    ratio: float,
    iterative_steps: int = 1,
    ignored_layers: list[nn.Module] | None = None,
    round_to: int | None = None,
    between_steps: Callable[[nn.Module, int], Any] | None = None,
) -> nn.Module:
    """Remove `ratio` of the channels of every prunable layer group (on a copy).

    torch-pruning traces `model` on `example` to build the dependency graph, scores channel
    groups by L2 magnitude and removes the weakest in `iterative_steps` equal steps;
    `between_steps(model, step)` (e.g. a short fine-tune) runs after each. `ignored_layers`
    (default: the final classifier, whose outputs are the classes) keep their out-channels.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"pruning ratio must be in [0, 1), got {ratio}")
    # ignored layers are named in the caller's model, then looked up in our copy
    names = {id(m): n for n, m in model.named_modules()}
    ignored = [final_classifier(model)] if ignored_layers is None else ignored_layers
    if any(id(m) not in names for m in ignored):
        raise ValueError("ignored_layers must be modules of `model`")
    ignored_names = {names[id(m)] for m in ignored}
    model = copy.deepcopy(model).eval()
    example = example.to(next(model.parameters()).device)
    ignored_layers = [m for n, m in model.named_modules() if n in ignored_names]
    pruner = tp.pruner.BasePruner(  # the class formerly called MetaPruner
        model,
        example,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=ratio,
        iterative_steps=iterative_steps,
        ignored_layers=ignored_layers,
        round_to=round_to,
    )
    for step in range(iterative_steps):
        pruner.step()
        if between_steps is not None:
            between_steps(model, step)
    return model.eval()


def save_pruned(path: str | Path, model: nn.Module, arch: dict[str, Any], **extra: Any) -> None:
    """Save a channel-pruned model: arch + state dict + every layer's shape (no pickled objects)."""
    save_structured(path, model, arch, **extra)


def load_pruned(path: str | Path, build: Builder | None = None) -> nn.Module:
    """Load `save_pruned` output with `weights_only=True`: build the original architecture
    (`build(arch)`, default: the project's classifier), shrink its layers, load the weights."""
    return load_structured(path, build)
