"""Low-rank factorisation: truncated SVD of nn.Linear, Tucker-2 (HOSVD) of nn.Conv2d.

- Linear W (out x in) ~ (U_r sqrt(S_r)) (sqrt(S_r) V_r^T): two linears in -> r -> out.
- Conv W (O x I x k x k) ~ core x_0 U_out x_1 U_in, with U_out / U_in the leading left singular
  vectors of the output- / input-channel unfoldings (HOSVD): 1x1 conv I -> r_in,
  k x k conv r_in -> r_out (the core, original stride/padding), 1x1 conv r_out -> O (+ bias).

A factorised layer becomes an `nn.Sequential` of plain layers, so models still export to ONNX
and save with `structure.save_structured` (or `prune.save_pruned`). Ranks come from an
explicit value, a `rank_ratio` of the full rank, or the singular-value `energy` to keep.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def choose_rank(
    singular_values: torch.Tensor, energy: float | None = None, rank_ratio: float | None = None
) -> int:
    """Smallest rank keeping `energy` of sum(s^2), or round(rank_ratio * full rank); >= 1."""
    full = len(singular_values)
    if energy is not None:
        if not 0.0 < energy <= 1.0:
            raise ValueError(f"energy must be in (0, 1], got {energy}")
        power = singular_values.double() ** 2
        kept = torch.cumsum(power, 0) / power.sum()
        return min(full, int((kept < energy - 1e-9).sum()) + 1)
    if rank_ratio is not None:
        if not 0.0 < rank_ratio <= 1.0:
            raise ValueError(f"rank_ratio must be in (0, 1], got {rank_ratio}")
        return max(1, min(full, round(rank_ratio * full)))
    raise ValueError("give a rank, an energy or a rank_ratio")


@torch.no_grad()
def svd_linear(
    layer: nn.Linear,
    rank: int | None = None,
    energy: float | None = None,
    rank_ratio: float | None = None,
) -> nn.Sequential:
    """Factorise `layer` into Linear(in, r, no bias) -> Linear(r, out, bias)."""
    w = layer.weight.detach().double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    r = rank or choose_rank(s, energy, rank_ratio)
    root = s[:r].sqrt()
    first = nn.Linear(layer.in_features, r, bias=False)
    second = nn.Linear(r, layer.out_features, bias=layer.bias is not None)
    first.weight.copy_(root[:, None] * vh[:r])
    second.weight.copy_(u[:, :r] * root[None, :])
    if layer.bias is not None:
        second.bias.copy_(layer.bias)
    return nn.Sequential(first, second).to(layer.weight.dtype)


def _leading_vectors(unfolding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    u, s, _ = torch.linalg.svd(unfolding, full_matrices=False)
    return u, s


@torch.no_grad()
def tucker2_conv(
    layer: nn.Conv2d,
    ranks: tuple[int, int] | None = None,
    energy: float | None = None,
    rank_ratio: float | None = None,
) -> nn.Sequential:
    """Factorise `layer` into 1x1 (I -> r_in) -> k x k core (r_in -> r_out) -> 1x1 (r_out -> O).

    `ranks` is (r_in, r_out). Grouped convolutions are not supported.
    """
    if layer.groups != 1:
        raise ValueError("tucker2_conv supports groups=1 only")
    w = layer.weight.detach().double()  # O x I x kh x kw
    n_out, n_in = w.shape[:2]
    u_out, s_out = _leading_vectors(w.reshape(n_out, -1))
    u_in, s_in = _leading_vectors(w.transpose(0, 1).reshape(n_in, -1))
    if ranks is not None:
        r_in, r_out = ranks
    else:
        r_in = choose_rank(s_in, energy, rank_ratio)
        r_out = choose_rank(s_out, energy, rank_ratio)
    u_out, u_in = u_out[:, :r_out], u_in[:, :r_in]
    core = torch.einsum("oikl,or,is->rskl", w, u_out, u_in)  # r_out x r_in x kh x kw

    first = nn.Conv2d(n_in, r_in, 1, bias=False)
    middle = nn.Conv2d(
        r_in,
        r_out,
        layer.kernel_size,
        layer.stride,
        layer.padding,
        layer.dilation,
        bias=False,
        padding_mode=layer.padding_mode,
    )
    last = nn.Conv2d(r_out, n_out, 1, bias=layer.bias is not None)
    first.weight.copy_(u_in.T[:, :, None, None])
    middle.weight.copy_(core)
    last.weight.copy_(u_out[:, :, None, None])
    if layer.bias is not None:
        last.bias.copy_(layer.bias)
    return nn.Sequential(first, middle, last).to(layer.weight.dtype)


def is_factored(module: nn.Module) -> bool:
    """`module` is a factorised layer as `svd_linear` (two Linears) or `tucker2_conv` (three
    Conv2ds) build it."""
    if not isinstance(module, nn.Sequential):
        return False
    layers = list(module)
    return (len(layers) == 2 and all(isinstance(m, nn.Linear) for m in layers)) or (
        len(layers) == 3 and all(isinstance(m, nn.Conv2d) for m in layers))


def count_factored(model: nn.Module) -> int:
    """How many layers of `model` are factorised."""
    return sum(is_factored(m) for m in model.modules())


@torch.no_grad()
def factored_weight(factored: nn.Sequential) -> torch.Tensor:
    """The dense weight a factorised Sequential (from svd_linear / tucker2_conv) represents."""
    layers = list(factored)
    if len(layers) == 2 and all(isinstance(m, nn.Linear) for m in layers):
        return layers[1].weight @ layers[0].weight
    if len(layers) == 3 and all(isinstance(m, nn.Conv2d) for m in layers):
        u_in = layers[0].weight[:, :, 0, 0]  # r_in x I
        u_out = layers[2].weight[:, :, 0, 0]  # O x r_out
        return torch.einsum("rskl,or,si->oikl", layers[1].weight, u_out, u_in)
    raise TypeError("not a factorised layer from svd_linear / tucker2_conv")


def reconstruction_error(layer: nn.Linear | nn.Conv2d, factored: nn.Sequential) -> float:
    """Relative Frobenius error ||W - W_hat|| / ||W|| of a factorisation."""
    w = layer.weight.detach().double()
    w_hat = factored_weight(factored).double()
    return float(torch.linalg.norm(w - w_hat) / torch.linalg.norm(w))


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def factorize_model(
    model: nn.Module,
    energy: float | None = None,
    rank_ratio: float | None = None,
    skip: list[str] | None = None,
    only_if_smaller: bool = True,
) -> nn.Module:
    """Copy of `model` with each Conv2d (groups=1) / Linear replaced by its factorisation.

    `skip`: module names to leave dense (default: the first conv, which sees raw pixels and
    has few input channels). With `only_if_smaller`, a layer is replaced only when the
    factorisation has fewer parameters than the original.
    """
    if (energy is None) == (rank_ratio is None):
        raise ValueError("give exactly one of energy or rank_ratio")
    model = copy.deepcopy(model)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    skip = set(names[:1] if skip is None else skip)
    for name in names:
        if name in skip:
            continue
        layer = model.get_submodule(name)
        if isinstance(layer, nn.Linear):
            factored = svd_linear(layer, energy=energy, rank_ratio=rank_ratio)
        elif layer.groups == 1:
            factored = tucker2_conv(layer, energy=energy, rank_ratio=rank_ratio)
        else:
            continue
        if only_if_smaller and _n_params(factored) >= _n_params(layer):
            continue
        factored.train(layer.training)
        parent_name, _, child = name.rpartition(".")
        model.get_submodule(parent_name).add_module(child, factored)
    return model
