"""`train.optimizer`: SGD, AdamW, or Muon on the conv filters with Nesterov SGD for the rest.

`muon` follows the public CIFAR-10 speed record (airbench94_muon): `torch.optim.Muon`
orthogonalises the momentum of every conv filter bank (a >= 3-D weight, seen as the
out-channels × rest matrix it is stored as), after scaling the bank back to Frobenius norm
sqrt(out-channels) (BatchNorm follows each conv, so only the direction matters); Nesterov SGD
trains everything else (the linear head, BatchNorm and whitening biases) with the groups of
`engine.param_groups`, the whitening conv's bias at the norm-bias lr (its group marked
`whiten_bias`: its lr decays to 0 over `whiten_bias_epochs`, as the record's). The frozen whitening
filters of a `fast` net and the head (2-D) are never Muon's.

torch only. `torch.optim.Muon` (torch >= 2.9) takes 2-D parameters only: `FilterMuon` hands it
2-D views that share each filter bank's storage, so its in-place update trains the conv.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from visionflow.core.errors import ConfigError
from visionflow.model import engine
from visionflow.model.zoo import FastNet

OPTIMIZERS = ("sgd", "adamw", "muon")
MUON_NS_STEPS = 3  # Newton-Schulz iterations per step, as the record (torch's default is 5)


def _column_order(t: torch.Tensor) -> list[int]:
    """Dims of `t` with 1.. in memory order (channels_last convs: out, kh, kw, in)."""
    return [0, *sorted(range(1, t.ndim), key=lambda d: -t.stride(d))]


def _matrix(t: torch.Tensor, order: list[int]) -> torch.Tensor:
    """`t` as an out × rest matrix, columns in `order` (orthogonalising a matrix commutes
    with permuting its columns, so any order trains the same)."""
    return t.permute(order).reshape(t.shape[0], -1)


_Muon = getattr(torch.optim, "Muon", torch.optim.Optimizer)  # torch >= 2.9


class FilterMuon(_Muon):  # type: ignore[misc,valid-type]
    """`torch.optim.Muon` on >= 2-D filter banks: it sees 2-D views sharing each bank's
    storage; each step copies the gradients in as matrices, rescales each bank to Frobenius
    norm sqrt(out-channels) (`normalize`, as the record), then runs Muon's own step."""

    def __init__(self, groups: list[dict[str, Any]], *, lr: float, momentum: float,
                 nesterov: bool = True, ns_steps: int = MUON_NS_STEPS,
                 normalize: bool = True) -> None:
        if _Muon is torch.optim.Optimizer:
            raise ConfigError(f"train.optimizer: muon needs torch.optim.Muon (torch >= 2.9), "
                              f"this is torch {torch.__version__}")
        self.sources: list[tuple[nn.Parameter, list[int]]] = []
        view_groups = []
        for g in groups:
            views = []
            for p in g["params"]:
                order = _column_order(p)
                view = _matrix(p.detach(), order)
                if view.untyped_storage().data_ptr() != p.untyped_storage().data_ptr():
                    raise ValueError(f"filter bank {tuple(p.shape)}: no 2-D view of it")
                self.sources.append((p, order))
                views.append(view)
            view_groups.append({**g, "params": views})
        self.normalize = normalize
        super().__init__(view_groups, lr=lr, weight_decay=0.0, momentum=momentum,
                         nesterov=nesterov, ns_steps=ns_steps)
        self._views = [v for g in self.param_groups for v in g["params"]]

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        for (p, order), v in zip(self.sources, self._views, strict=True):
            v.grad = None if p.grad is None else _matrix(p.grad, order)
            if self.normalize and p.grad is not None:
                p.mul_(math.sqrt(len(p)) / p.norm().clamp_min(1e-12))
        return super().step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The views' gradients and the filter banks' own: `backward` accumulates into the
        banks, which no optimizer's groups hold."""
        super().zero_grad(set_to_none=set_to_none)
        for p, _ in self.sources:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()


class Optimizers(torch.optim.Optimizer):
    """Several optimizers stepped as one: `param_groups` are theirs (the same dicts), so one
    LR scheduler and `GradScaler` drive them all; the state dict holds each one's."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = optimizers
        super().__init__([g for o in optimizers for g in o.param_groups], {})
        # the same dicts: the scheduler's lr lands in each optimizer's own group
        self.param_groups = [g for o in optimizers for g in o.param_groups]

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = closure() if closure is not None else None
        for o in self.optimizers:
            o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        for o, s in zip(self.optimizers, state_dict["optimizers"], strict=True):
            o.load_state_dict(s)  # new group dicts: link them again
        self.param_groups = [g for o in self.optimizers for g in o.param_groups]


def muon_filters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable conv filter banks Muon trains: >= 3-D weights of convolutions, except a
    `fast` net's whitening conv (set from data) and anything that is not a conv."""
    skip = {id(m.whiten.weight) for m in model.modules() if isinstance(m, FastNet)}
    return [m.weight for m in model.modules()
            if isinstance(m, nn.modules.conv._ConvNd) and m.weight.requires_grad
            and m.weight.ndim >= 3 and id(m.weight) not in skip]


def make_optimizer(model: nn.Module, cfg: Any, backbone: set[str]) -> torch.optim.Optimizer:
    """`cfg.optimizer` (sgd | adamw | muon) over `model`'s parameters (see the module doc)."""
    name = cfg.optimizer
    if name not in OPTIMIZERS:
        raise ConfigError(f"train.optimizer: {name!r}: unknown optimizer, choose one of "
                          f"{', '.join(OPTIMIZERS)}")
    if name != "muon":
        return engine.make_optimizer(model, cfg, backbone)
    filters = muon_filters(model)
    ids = {id(p) for p in filters}
    names = {id(p): n for n, p in model.named_parameters()}
    whiten_bias = {id(m.whiten.bias) for m in model.modules() if isinstance(m, FastNet)}
    scale = float(getattr(cfg, "bias_lr_scale", 1.0))
    groups = []
    for g in engine.param_groups(model, cfg, backbone):
        rest = [p for p in g["params"] if id(p) not in ids and id(p) not in whiten_bias]
        biases = [p for p in g["params"] if id(p) in whiten_bias]
        if rest:
            groups.append({**g, "params": rest})
        if biases:  # the whitening bias trains at the norm-bias lr, as in the record
            decay = g["weight_decay"] > 0
            groups.append({"params": biases, "lr": cfg.lr * scale, "whiten_bias": True,
                           "weight_decay": cfg.weight_decay / scale if decay else 0.0})
    muon_lr = float(cfg.muon_lr)
    filter_groups = [{"params": [p for p in filters if names.get(id(p)) not in backbone],
                      "lr": muon_lr},
                     {"params": [p for p in filters if names.get(id(p)) in backbone],
                      "lr": muon_lr * cfg.backbone_lr_mult}]
    filter_groups = [g for g in filter_groups if g["params"]]
    sgd = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                          nesterov=cfg.momentum > 0)
    if not filter_groups:
        return sgd
    muon = FilterMuon(filter_groups, lr=muon_lr, momentum=float(cfg.muon_momentum))
    return Optimizers(sgd, muon)


def compile_on(setting: bool | str, device: torch.device) -> bool:
    """`train.compile`: true, false, or auto (on CUDA)."""
    if setting == "auto":
        return torch.device(device).type == "cuda"
    return bool(setting)
