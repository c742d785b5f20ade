"""Model registry: every model trains at 16/32/64 px, 1 or 3 channels, channels_last."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.fx
from torch import nn

from visionflow.core.config import MODEL_NAMES
from visionflow.model.zoo import (
    count_params,
    create_model,
    init_whitening,
    list_models,
    zoo_model,
)

NUM_CLASSES = 3


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small CPU convs: one intra-op thread is faster and steadier on a shared 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _train_step(model: nn.Module, size: int, channels: int = 3) -> torch.Tensor:
    """One forward + backward on a batch of 2 in channels_last; returns the logits."""
    torch.manual_seed(0)
    model = model.to(memory_format=torch.channels_last).train()
    x = torch.randn(2, channels, size, size).to(memory_format=torch.channels_last)
    logits = model(x)
    logits.float().logsumexp(1).mean().backward()
    return logits


def _call_counts(model: nn.Module, x: torch.Tensor) -> Counter[str]:
    """How many times each leaf module runs in one forward pass."""
    counts: Counter[str] = Counter()
    handles = [
        m.register_forward_hook(lambda *_, name=name: counts.update([name]))
        for name, m in model.named_modules()
        if not list(m.children())
    ]
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return counts


def test_zoo_matches_config() -> None:
    assert list_models() == sorted(MODEL_NAMES)


def test_unknown_model_names_choices() -> None:
    with pytest.raises(ValueError, match="unknown model 'vgg16'.*resnet18"):
        create_model("vgg16", num_classes=10)


def test_register_duplicate_rejected() -> None:
    with pytest.raises(ValueError, match="already registered"):
        zoo_model("fast")(lambda **_: nn.Identity())


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("size", [16, 32, 64])
def test_forward_backward(name: str, size: int) -> None:
    model = create_model(name, NUM_CLASSES, image_size=size)
    logits = _train_step(model, size)
    assert logits.shape == (2, NUM_CLASSES)
    assert torch.isfinite(logits).all()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_grayscale_input(name: str) -> None:
    model = create_model(name, NUM_CLASSES, image_size=32, in_channels=1)
    assert _train_step(model, 32, channels=1).shape == (2, NUM_CLASSES)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_module_runs_once_per_forward(name: str) -> None:
    """One module per call site (no shared ReLU): needed for int8 fusion/observers."""
    model = create_model(name, NUM_CLASSES, image_size=16)
    counts = _call_counts(model, torch.randn(1, 3, 16, 16))
    assert counts, "no leaf module ran"
    assert max(counts.values()) == 1, [k for k, v in counts.items() if v > 1]
    # FX-traceable (graph-mode quantization) with one call_module node per module
    graph = torch.fx.symbolic_trace(model).graph
    targets = [node.target for node in graph.nodes if node.op == "call_module"]
    assert len(targets) == len(set(targets))


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_relu_per_call_site(name: str) -> None:
    model = create_model(name, NUM_CLASSES, image_size=16)
    relus = {n for n, m in model.named_modules() if isinstance(m, nn.ReLU)}
    counts = _call_counts(model, torch.randn(1, 3, 16, 16))
    assert {n: counts[n] for n in relus} == dict.fromkeys(relus, 1)
    per_block = 2 if name == "resnet18" else 3
    assert len(relus) == 1 + per_block * (8 if name == "resnet18" else 16)


def test_small_and_large_stems() -> None:
    small = create_model("resnet18", 10, image_size=32)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity)
    large = create_model("resnet18", 10, image_size=224, in_channels=1)
    assert large.conv1.kernel_size == (7, 7) and large.conv1.in_channels == 1
    assert isinstance(large.maxpool, nn.MaxPool2d)
    dense = create_model("densenet_bc", 10, image_size=64)
    assert dense.features.conv0.stride == (1, 1)
    assert isinstance(dense.features.pool0, nn.Identity)


def test_alexnet_tiny_inputs() -> None:
    model = create_model("alexnet", NUM_CLASSES).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 8, 8)).shape == (1, NUM_CLASSES)


def test_fast_rejects_tiny_images() -> None:
    with pytest.raises(ValueError, match="image_size >= 16"):
        create_model("fast", 10, image_size=8)


def test_count_params() -> None:
    model = create_model("densenet_bc", 10)
    assert count_params(model) == sum(p.numel() for p in model.parameters())
    assert 0.5e6 < count_params(model) < 1.0e6  # DenseNet-BC L=100 k=12 is ~0.8M


@pytest.mark.parametrize("channels", [1, 3])
def test_init_whitening_whitens_patches(channels: int) -> None:
    gen = torch.Generator().manual_seed(0)
    base = torch.rand(64, channels, 16, 16, generator=gen)
    images = (base + base.roll(1, dims=3)).mul(127).to(torch.uint8)  # correlated neighbours
    model = init_whitening(create_model("fast", 10, in_channels=channels), images)
    assert not model.whiten.weight.requires_grad and model.whiten.bias.requires_grad
    with torch.no_grad():
        out = model.whiten(images.float() / 255)
    half = out[:, : out.shape[1] // 2].permute(0, 2, 3, 1).reshape(-1, out.shape[1] // 2)
    cov = torch.cov(half.T.double())
    assert torch.allclose(half.mean(0), torch.zeros(half.shape[1]), atol=1e-3)
    assert torch.allclose(cov, torch.eye(len(cov), dtype=cov.dtype), atol=0.05)
