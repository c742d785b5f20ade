"""Temperature scaling (Guo et al., 2017): one scalar T > 0 such that softmax(logits / T)
matches how often the model is right on held-out images. Predictions (argmax, top-k) do not
change; the probabilities users see (`score`, `topk`, ECE) do.

The train stage fits T on the val split and stores it in the model's `Arch`; every consumer
applies it through `evaluate.model_logits(..., temperature=arch.temperature)`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

T_RANGE = (0.05, 1000.0)  # at 1,000 a model whose logits say nothing scores near uniform


def unfittable(logits: torch.Tensor, target: torch.Tensor) -> str | None:
    """Why the likelihood cannot be fitted on these images, or None. When every prediction
    is right it only grows as T falls to 0: the fit would make the model as sure of itself as
    the range allows (`fit_temperature` then matches confidence to accuracy instead)."""
    if len(logits) == 0:
        return "no val images"
    if bool((logits.argmax(1) == target.to(logits.device)).all()):
        return f"all {len(logits)} val images predicted right"
    return None


def fit_temperature(logits: torch.Tensor, target: torch.Tensor, max_iter: int = 100) -> float:
    """The T within `T_RANGE` that minimises the negative log-likelihood of `target` under
    softmax(logits / T). The likelihood has one optimum in log T, so a fit that runs past the
    range (a model far too sure of itself) is held at the nearer end. With no val images:
    1.0. With no mistake among them the likelihood has no optimum: T then makes the mean top
    probability the accuracy the rule of succession expects, (n + 1) / (n + 2)."""
    if unfittable(logits, target) is not None:
        n = len(logits)
        return 1.0 if n == 0 else _confidence_at(logits.detach().float().cpu(), (n + 1) / (n + 2))
    logits, target = logits.detach().float().cpu().clone(), target.long().cpu().clone()
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), target)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    fitted = float(log_t.detach().exp())
    candidates = [*T_RANGE, 1.0] + ([min(max(fitted, T_RANGE[0]), T_RANGE[1])]
                                    if math.isfinite(fitted) else [])
    with torch.no_grad():
        return min(candidates, key=lambda t: float(F.cross_entropy(logits / t, target)))


def _confidence_at(logits: torch.Tensor, target: float, steps: int = 60) -> float:
    """The T in `T_RANGE` whose mean top softmax probability is `target` (bisection on log T:
    each top probability falls as T grows)."""
    lo, hi = math.log(T_RANGE[0]), math.log(T_RANGE[1])
    with torch.no_grad():
        for _ in range(steps):
            mid = (lo + hi) / 2
            if float((logits / math.exp(mid)).softmax(1).amax(1).mean()) > target:
                lo = mid
            else:
                hi = mid
    return math.exp((lo + hi) / 2)
