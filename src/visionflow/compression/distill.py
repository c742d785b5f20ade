"""Knowledge distillation (Hinton et al. 2015) and a plain fine-tune loop, both short and CPU-able.

Distillation loss: alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T))
                   + (1 - alpha) * CE(student, labels).

Images are N x C x H x W, float in [0, 1] or uint8 (scaled to [0, 1] batch by batch, so the
packed data's uint8 train split is used without a float copy of it).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from visionflow.model.inference import as_input, model_device, predict_logits


def kl_divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Mean over the batch of KL(teacher || student) on temperature-softened distributions."""
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((predict_logits(model, x).argmax(1) == y.cpu()).float().mean())


def _batches(n: int, batch_size: int, generator: torch.Generator):
    perm = torch.randperm(n, generator=generator)
    return [perm[i : i + batch_size] for i in range(0, n, batch_size)]


def distill(
    student: nn.Module,
    teacher: nn.Module,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    temperature: float,
    alpha: float,
    batch_size: int,
    seed: int = 0,
    teacher_logits: torch.Tensor | None = None,
) -> tuple[nn.Module, list[dict[str, float]]]:
    """Train `student` (in place) to match `teacher`'s softened outputs plus the hard labels.

    `x_train` is N x C x H x W, float in [0, 1] or uint8 (what both models take, scaled).
    `teacher_logits` (N x classes), when given, are used instead of running `teacher` (which
    may then be None): compute them once when several students learn from one teacher.
    Returns the student and a per-epoch history: mean `loss`, `kl` (T^2-scaled soft term)
    and `ce`.
    """
    if teacher_logits is None:  # the teacher is frozen: compute once
        teacher_logits = predict_logits(teacher, x_train)
    device = model_device(student)
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    history = []
    for epoch in range(epochs):
        student.train()
        sums = {"loss": 0.0, "kl": 0.0, "ce": 0.0}
        for idx in _batches(len(x_train), batch_size, gen):
            out = student(as_input(x_train[idx], device))
            kl = kl_divergence(out, teacher_logits[idx].to(device), temperature) * temperature**2
            ce = F.cross_entropy(out, y_train[idx].to(device))
            loss = alpha * kl + (1 - alpha) * ce
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for k, v in (("loss", loss), ("kl", kl), ("ce", ce)):
                sums[k] += v.item() * len(idx)
        history.append({"epoch": epoch + 1, **{k: v / len(x_train) for k, v in sums.items()}})
    return student.eval(), history


def finetune(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int = 0,
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Plain cross-entropy training with Adam (in place); for recovering after compression.
    `x`: float in [0, 1] or uint8."""
    device = model_device(model)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    history = []
    for epoch in range(epochs):
        model.train()
        total = 0.0
        for idx in _batches(len(x), batch_size, gen):
            loss = F.cross_entropy(model(as_input(x[idx], device)), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        history.append({"epoch": epoch + 1, "loss": total / len(x)})
    return model.eval(), history
