"""Compression library: every variant runs, reloads from disk and is scored on real data.

A tiny residual CNN (normalisation first, BN, a downsampling block, linear head) is trained
once per module on sklearn digits (8x8 upsampled to 16x16, 3 channels) in a few seconds, so
accuracies mean something. Structured pruning is also checked on the project's resnet18
(small-image stem) with the default loader.
"""

from __future__ import annotations

import subprocess
import sys
from collections import OrderedDict
from dataclasses import asdict
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock

from visionflow.compression import lowrank
from visionflow.compression.distill import accuracy, distill, finetune, kl_divergence
from visionflow.compression.measure import (
    count_macs,
    count_params,
    cpu_latency_ms,
    interleaved_latency_ms,
    model_size_bytes,
    ort_latency_ms,
)
from visionflow.compression.onnx_export import OrtClassifier, export_onnx
from visionflow.compression.prune import (
    load_pruned,
    magnitude_prune,
    save_pruned,
    structured_prune,
)
from visionflow.compression.quantize import quantize_int8_onnx
from visionflow.compression.structure import load_structured, save_structured
from visionflow.model.inference import predict_logits as torch_logits

ARCH = {"name": "tiny_resnet", "num_classes": 10, "width": 32, "in_channels": 3}
SIZE = 16


class Normalize(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.full((1, channels, 1, 1), 0.3))
        self.register_buffer("std", torch.full((1, channels, 1, 1), 0.4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Block(BasicBlock):
    """BasicBlock with one ReLU module per call site (PT2E quantizers need that)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu2(out + identity)


def build(arch: dict[str, Any]) -> nn.Module:
    """Stand-in for the project's registry: a two-block residual net."""
    w, c = arch["width"], arch["in_channels"]
    down = nn.Sequential(nn.Conv2d(w, 2 * w, 1, 2, bias=False), nn.BatchNorm2d(2 * w))
    return nn.Sequential(
        OrderedDict(
            norm=Normalize(c),
            stem=nn.Sequential(nn.Conv2d(c, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()),
            block1=Block(w, w),
            block2=Block(w, 2 * w, stride=2, downsample=down),
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
            fc=nn.Linear(2 * w, arch["num_classes"]),
        )
    )


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # other suites share the 2 cores: 2 oversubscribed threads are ~8x slower than 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data() -> dict[str, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    x = x.repeat(1, 3, 1, 1).clamp(0, 1)
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1300], perm[1300:]
    return {"x_train": x[tr], "y_train": y[tr], "x_test": x[te], "y_test": y[te]}


@pytest.fixture(scope="module")
def teacher(data) -> nn.Module:
    torch.manual_seed(0)
    model = build(ARCH)
    finetune(model, data["x_train"], data["y_train"], epochs=3, lr=2e-3, batch_size=32)
    return model.eval()


@pytest.fixture(scope="module")
def teacher_acc(teacher, data) -> float:
    return accuracy(teacher, data["x_test"], data["y_test"])


@pytest.fixture(scope="module")
def fp32_onnx(teacher, data, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "model_fp32.onnx"
    return export_onnx(teacher, data["x_test"][:1], path)


def ort_accuracy(path, data) -> float:
    logits = OrtClassifier(path).predict_logits(data["x_test"])
    return float((logits.argmax(1) == data["y_test"].numpy()).mean())


def test_teacher_learns_digits(teacher_acc):
    assert teacher_acc >= 0.9


def test_measure_helpers(teacher, fp32_onnx):
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert count_macs(conv, (1, 3, 10, 10)) == 8 * 3 * 9 * 10 * 10
    assert count_params(conv) == 8 * 3 * 9
    assert model_size_bytes(fp32_onnx) == fp32_onnx.stat().st_size > 4 * count_params(teacher)
    example = torch.rand(1, 3, SIZE, SIZE)
    eager = cpu_latency_ms(teacher, example, batch=4, reps=5, warmup=2)
    ort = ort_latency_ms(OrtClassifier(fp32_onnx), example, batch=4, reps=5, warmup=2)
    for result in (eager, ort):
        assert result["median_ms"] > 0 and result["p90_ms"] >= result["median_ms"]
        assert result["threads"] == torch.get_num_threads() and result["reps"] == 5
    both = interleaved_latency_ms({"a": lambda: None, "b": lambda: teacher(example)}, reps=4)
    assert set(both) == {"a", "b"} and both["b"]["reps"] == 4
    assert both["b"]["median_ms"] > both["a"]["median_ms"]


def test_onnx_export_dynamic_batch_matches_eager(teacher, fp32_onnx, data, teacher_acc):
    assert not [p for p in fp32_onnx.parent.iterdir() if p.name.endswith(".tmp")]
    clf = OrtClassifier(fp32_onnx)
    for n in (1, 7):
        x = data["x_test"][:n]
        np.testing.assert_allclose(
            clf.predict_logits(x), torch_logits(teacher, x).numpy(), rtol=1e-3, atol=1e-4
        )
    # batched over 3 chunks of 200: same predictions as eager on the whole test set
    assert ort_accuracy(fp32_onnx, data) == pytest.approx(teacher_acc, abs=1e-6)
    assert clf.predict_logits(data["x_test"].numpy(), batch_size=200).shape == (497, 10)


def test_int8_qdq_agrees_with_fp32_and_is_smaller(fp32_onnx, data, teacher_acc):
    int8 = quantize_int8_onnx(fp32_onnx, data["x_train"][:128], fp32_onnx.with_name("int8.onnx"))
    import onnx

    ops = {n.op_type for n in onnx.load(str(int8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    ratio = model_size_bytes(int8) / model_size_bytes(fp32_onnx)
    assert ratio <= 0.35
    fp32_top1 = OrtClassifier(fp32_onnx).predict_logits(data["x_test"]).argmax(1)
    int8_top1 = OrtClassifier(int8).predict_logits(data["x_test"]).argmax(1)
    assert (fp32_top1 == int8_top1).mean() >= 0.95
    assert ort_accuracy(int8, data) >= teacher_acc - 0.03


def test_magnitude_prune_is_plain_state_dict(teacher, data, teacher_acc, tmp_path):
    before = teacher.fc.weight.clone()
    pruned, sparsity = magnitude_prune(teacher, 0.5)
    assert sparsity == pytest.approx(0.5, abs=0.01)
    assert torch.equal(teacher.fc.weight, before)  # the original is untouched
    path = tmp_path / "sparse.pt"
    torch.save({"arch": ARCH, "state_dict": pruned.state_dict()}, path)
    blob = torch.load(path, weights_only=True)
    reloaded = build(blob["arch"])
    reloaded.load_state_dict(blob["state_dict"])  # same shapes as the original arch
    # half the weights gone and no fine-tune: ~0.87 measured, chance is 0.1
    assert accuracy(reloaded, data["x_test"], data["y_test"]) >= 0.75


def test_structured_prune_shrinks_macs_and_reloads(teacher, data, teacher_acc, tmp_path):
    shape = (1, 3, SIZE, SIZE)
    pruned = structured_prune(teacher, data["x_test"][:1], ratio=0.5)
    assert pruned.fc.out_features == 10  # classifier outputs kept
    mac_ratio = count_macs(pruned, shape) / count_macs(teacher, shape)
    assert 0.2 <= mac_ratio <= 0.35  # both sides of each conv halve: ~0.25x
    finetune(pruned, data["x_train"], data["y_train"], epochs=2, lr=2e-3, batch_size=64)

    path = tmp_path / "pruned.pt"
    save_pruned(path, pruned, ARCH)
    blob = torch.load(path, weights_only=True)
    with pytest.raises(RuntimeError, match="size mismatch"):
        build(blob["arch"]).load_state_dict(blob["state_dict"])
    reloaded = load_pruned(path, build=build)
    x = data["x_test"]
    torch.testing.assert_close(torch_logits(reloaded, x), torch_logits(pruned, x))
    assert accuracy(reloaded, x, data["y_test"]) >= teacher_acc - 0.1


def test_structured_prune_project_resnet18_iterative(tmp_path):
    """The project's classifier (normalisation + registry resnet18, small stem), reloaded by
    `load_pruned` with its default builder from the stored `Arch` dict."""
    from visionflow.model.classifier import Arch, build_classifier

    arch = asdict(Arch(name="resnet18", num_classes=10, image_size=32))
    model = build_classifier(Arch(**arch)).eval()
    example = torch.rand(2, 3, 32, 32)
    steps: list[int] = []
    pruned = structured_prune(
        model,
        example[:1],
        ratio=0.5,
        iterative_steps=2,
        between_steps=lambda m, step: steps.append(step),
    )
    assert steps == [0, 1]
    mac_ratio = count_macs(pruned, (1, 3, 32, 32)) / count_macs(model, (1, 3, 32, 32))
    assert 0.2 <= mac_ratio <= 0.35
    assert pruned.net.fc.out_features == 10 and pruned.net.layer1[0].conv1.out_channels == 32

    path = tmp_path / "r18_pruned.pt"
    save_pruned(path, pruned, arch)
    with pytest.raises(RuntimeError, match="size mismatch"):
        build_classifier(Arch(**arch)).load_state_dict(
            torch.load(path, weights_only=True)["state_dict"]
        )
    reloaded = load_pruned(path)
    torch.testing.assert_close(torch_logits(reloaded, example), torch_logits(pruned, example))


def test_distillation_lowers_kl(teacher, data, tmp_path):
    torch.manual_seed(1)
    arch = {**ARCH, "width": 16}  # ~1/4 of the teacher's parameters
    student = build(arch)
    x_test = data["x_test"]
    t_logits = torch_logits(teacher, x_test)
    kl_before = float(kl_divergence(torch_logits(student, x_test), t_logits))
    student, history = distill(
        student,
        teacher,
        data["x_train"],
        data["y_train"],
        epochs=3,
        lr=3e-3,
        temperature=4.0,
        alpha=0.7,
        batch_size=32,
    )
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["kl"] < history[0]["kl"]

    path = tmp_path / "student.pt"
    torch.save({"arch": arch, "state_dict": student.state_dict()}, path)
    blob = torch.load(path, weights_only=True)
    reloaded = build(blob["arch"])
    reloaded.load_state_dict(blob["state_dict"])
    kl_after = float(kl_divergence(torch_logits(reloaded, x_test), t_logits))
    assert kl_after < 0.5 * kl_before
    assert accuracy(reloaded, x_test, data["y_test"]) >= 0.85
    assert count_params(reloaded) < 0.3 * count_params(teacher)


def test_lowrank_error_falls_with_rank(teacher):
    conv = teacher.block2.conv2  # 64 -> 64, 3x3
    errors = [
        lowrank.reconstruction_error(conv, lowrank.tucker2_conv(conv, ranks=(r, r)))
        for r in (4, 16, 32, 64)
    ]
    assert errors == sorted(errors, reverse=True) and errors[0] > errors[1]
    assert errors[-1] < 1e-5  # full ranks reproduce the weight

    fc = teacher.fc  # 10 x 64: full rank 10
    fc_errors = [
        lowrank.reconstruction_error(fc, lowrank.svd_linear(fc, rank=r)) for r in (2, 5, 10)
    ]
    assert fc_errors == sorted(fc_errors, reverse=True) and fc_errors[-1] < 1e-5
    ranks = [lowrank.tucker2_conv(conv, energy=e)[1].out_channels for e in (0.5, 0.9, 0.99)]
    assert ranks == sorted(ranks) and ranks[0] < ranks[-1]


def test_factorize_model_runs_and_reloads(teacher, data, teacher_acc, tmp_path):
    factored = lowrank.factorize_model(teacher, rank_ratio=0.5)
    assert isinstance(factored.stem[0], nn.Conv2d)  # first conv skipped
    assert isinstance(factored.block2.conv2, nn.Sequential)
    assert count_params(factored) < 0.6 * count_params(teacher)
    finetune(factored, data["x_train"], data["y_train"], epochs=1, lr=2e-3, batch_size=32)

    path = tmp_path / "lowrank.pt"
    save_structured(path, factored, ARCH)
    with pytest.raises(RuntimeError):
        build(ARCH).load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    reloaded = load_structured(path, build=build)
    x = data["x_test"]
    torch.testing.assert_close(torch_logits(reloaded, x), torch_logits(factored, x))
    assert accuracy(reloaded, x, data["y_test"]) >= teacher_acc - 0.1


def test_pt2e_x86_int8_agrees_with_fp32(teacher, data):
    pytest.importorskip("torchao", reason="torchao is optional")
    from visionflow.compression.pt2e import quantize_pt2e_x86

    quantized = quantize_pt2e_x86(teacher, data["x_train"][:128])
    x = data["x_test"][:200]
    with torch.no_grad():  # reference (uncompiled) int8 graph: slow but exact semantics
        int8_top1 = quantized(x).argmax(1)
    fp32_top1 = torch_logits(teacher, x).argmax(1)
    assert (int8_top1 == fp32_top1).float().mean() >= 0.95


def test_int8_keeps_the_first_conv_fp32_and_takes_uint8(fp32_onnx, data, tmp_path):
    import onnx

    calib = (data["x_train"][:64] * 255).round().to(torch.uint8)  # as the augment cache holds
    int8 = quantize_int8_onnx(fp32_onnx, calib, tmp_path / "int8.onnx", keep_first_conv=True)
    graph = onnx.load(str(int8)).graph
    first = next(n for n in graph.node if n.op_type == "Conv")
    producers = {o: n.op_type for n in graph.node for o in n.output}
    inits = {i.name for i in graph.initializer}
    # the stem reads fp32 weights straight from an initializer (no DequantizeLinear before it)
    assert first.input[1] in inits and producers.get(first.input[1]) is None
    later = [n for n in graph.node if n.op_type == "Conv"][1]
    assert producers.get(later.input[1]) == "DequantizeLinear"
    fp32_top1 = OrtClassifier(fp32_onnx).predict_logits(data["x_test"]).argmax(1)
    int8_top1 = OrtClassifier(int8).predict_logits(data["x_test"]).argmax(1)
    assert (int8_top1 == fp32_top1).mean() >= 0.95


def test_int8_falls_back_when_symbolic_shape_inference_fails(data, tmp_path):
    """dynamo exports a global max-pool + flatten as ReduceMax -> Reshape, which ORT's
    symbolic shape inference cannot follow; plain ONNX shape inference is used instead."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1),
                          nn.Flatten(), nn.Linear(8, 10)).eval()
    fp32 = export_onnx(model, data["x_test"][:1], tmp_path / "maxpool.onnx")
    int8 = quantize_int8_onnx(fp32, data["x_train"][:32], tmp_path / "maxpool_int8.onnx")
    assert OrtClassifier(int8).predict_logits(data["x_test"][:4]).shape == (4, 10)


def test_ort_module_runs_like_a_torch_classifier(teacher, fp32_onnx, data):
    from visionflow.compression.onnx_export import OrtModule

    x = data["x_test"][:16]
    torch.testing.assert_close(OrtModule(fp32_onnx)(x), torch_logits(teacher, x),
                               rtol=1e-3, atol=1e-4)
    assert list(OrtModule(fp32_onnx).parameters()) == []


def test_distill_takes_uint8_and_precomputed_teacher_logits(teacher, data):
    torch.manual_seed(2)
    student = build({**ARCH, "width": 8})
    x8 = (data["x_train"][:256] * 255).round().to(torch.uint8)
    logits = torch_logits(teacher, x8)  # uint8 input is scaled like float [0, 1]
    torch.testing.assert_close(logits, torch_logits(teacher, x8.float() / 255))
    _, history = distill(student, None, x8, data["y_train"][:256], epochs=2, lr=3e-3,
                         temperature=4.0, alpha=0.7, batch_size=32, teacher_logits=logits)
    assert history[-1]["kl"] < history[0]["kl"]


def test_pt2e_recipe_round_trip_and_first_conv_kept(teacher, data, tmp_path):
    pytest.importorskip("torchao", reason="torchao is optional")
    from torchao.quantization.pt2e import quantize_pt2e as qp

    from visionflow.compression import pt2e

    fold = qp._fold_conv_bn_qat
    calib = (data["x_train"][:64] * 255).round().to(torch.uint8)
    quantized = pt2e.quantize_pt2e_x86(teacher, calib, keep_first_conv=True)
    assert qp._fold_conv_bn_qat is fold  # the QAT pass skipped during convert is restored
    assert pt2e.first_conv_name(teacher) == "stem.0"
    path = tmp_path / "recipe.pt"
    pt2e.save_recipe(path, teacher, ARCH, calib, keep_first_conv=True)
    blob = torch.load(path, weights_only=True)
    assert blob["pt2e"]["calibration"].dtype == torch.uint8
    reloaded = pt2e.load_recipe(path, build=build)
    x = data["x_test"][:64]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), quantized(x))  # calibration is deterministic
        lowered = pt2e.lower_x86(quantized, x[:8])
        agree = (lowered(x[:8]).argmax(1) == quantized(x[:8]).argmax(1)).float().mean()
    assert agree >= 0.75  # oneDNN kernels round differently from the reference graph


def test_gpu_latency_is_none_without_cuda():
    from visionflow.compression.measure import gpu_latency_ms

    result = gpu_latency_ms(nn.Conv2d(3, 4, 3), torch.rand(3, 8, 8), reps=2, warmup=1)
    assert (result is None) == (not torch.cuda.is_available())
    if result is not None:
        assert result["median_ms"] > 0 and result["device"]


def test_search_pareto_and_choice_on_rows():
    from visionflow.compression.pareto import choose, mark, pareto_flags

    def row(name, top1, size, macs, ms, deployable=True, candidate=True):
        return {"name": name, "top1": top1, "top1_drop_points": round(100 * (0.9 - top1), 6),
                "size_bytes": size, "macs": macs, "cpu_b1_ms": ms, "deployable": deployable,
                "candidate": candidate}

    original = row("original", 0.90, 100, 1000, 10.0, candidate=False)
    rows = [original,
            row("a", 0.895, 25, 1000, 6.0),  # -0.5 pt, 4x smaller
            row("b", 0.880, 10, 250, 3.0),  # -2 pt
            row("c", 0.900, 60, 490, 5.0),  # no drop
            row("d", 0.905, 80, 100, 1.0, deployable=False),  # fastest, not deployable
            row("e", 0.800, 50, 900, 9.0)]  # dominated by a
    # the original is dominated by d: the front is drawn over every measured row
    assert pareto_flags(rows, "size") == [False, True, True, True, True, False]
    assert pareto_flags(rows, "cpu_latency") == [False, False, False, False, True, False]
    assert choose(rows, original, "size", 1.0)[0] == "a"
    assert choose(rows, original, "size", 2.0)[0] == "b"
    assert choose(rows, original, "macs", 1.0)[0] == "c"  # a has the original's MACs
    assert choose(rows, original, "cpu_latency", 0.0)[0] == "c"
    name, reason = choose(rows, original, "size", 0.0)
    assert name == "c"
    rows[3]["size_bytes"] = 100  # c no longer smaller than the original
    name, reason = choose(rows, original, "size", 0.0)
    assert name is None and "no gain: c" in reason
    mark(rows, 1.0, "a")
    assert [r["selected"] for r in rows] == [False, True, False, False, False, False]
    assert [r["in_budget"] for r in rows] == [True, True, False, True, True, False]


def test_torchao_imports_without_torchs_enum_warning():
    """torch logs a deprecation warning when torchao registers its enum on import: not a line
    for a compress stage's user. `torchao_available` imports it first, quietly."""
    code = ("from visionflow.compression.pt2e import torchao_available\n"
            "assert torchao_available()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "register_constant" not in proc.stderr, proc.stderr
