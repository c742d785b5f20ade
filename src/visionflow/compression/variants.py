"""The compressed variants of a classifier: one builder per method, each returning a scored
`Variant` whose files are written to `ctx.out`.

- `int8_variant`: ONNX Runtime static QDQ int8, per-channel weights, calibrated on a train
  subset, of the original's ONNX export (`model_int8.onnx`; `onnx_reference` exports the
  original as `model_fp32.onnx`, a reference row) or of any deployable fp32 variant;
- `magnitude_variant`: global L1 *unstructured* pruning. Zeros in dense kernels give no
  speed-up and no smaller file: it is reported, never deployed;
- `structured_variant`: channel pruning with torch-pruning's dependency graph (iterative
  steps, a short fine-tune after each, distilled from the original when `finetune_distill`),
  saved as layer structure + state dict;
- `lowrank_variant`: Tucker-2 convolutions / SVD linears at one singular-value energy,
  fine-tuned;
- `student_variant`: a smaller zoo student (`student_model`, `student_kwargs`) trained
  on the original's soft targets plus the labels;
- `pt2e_variant`: torchao PT2E int8 (X86InductorQuantizer), lowered to oneDNN kernels for
  timing. Measured, not deployable (its saved form cannot be loaded without unpickling; a
  recipe that re-derives it is saved instead).

Each variant is scored in the form it deploys in: fp32 torch variants are saved, reloaded
(`weights_only=True`) and compared with the in-memory model, then exported to ONNX and
re-scored from that file (ORT and PyTorch must agree on >= `onnx_min_agreement` of the
test images). A builder raises `Skipped` when its method cannot run here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visionflow.compression import pt2e
from visionflow.compression.context import Context, on_device, rounded
from visionflow.compression.distill import distill, kl_divergence
from visionflow.compression.lowrank import count_factored, factorize_model
from visionflow.compression.measure import Runner, batch_of, eager_runner, ort_runner
from visionflow.compression.onnx_export import OrtModule, export_onnx
from visionflow.compression.prune import (
    load_pruned,
    magnitude_prune,
    save_pruned,
    structured_prune,
)
from visionflow.compression.quantize import quantize_int8_onnx
from visionflow.compression.structure import load_structured, save_structured
from visionflow.model.classifier import Arch, Classifier, load_classifier, save_classifier
from visionflow.model.zoo import create_model


@dataclass
class Variant:
    name: str
    family: str
    recipe: list[dict[str, Any]]
    entry: dict[str, Any]  # its row in the report
    model: nn.Module | None = None  # the torch form (fp32 families)
    onnx: Path | None = None  # the deployable file of ONNX-deployed variants
    runners: dict[str, Runner] = field(default_factory=dict)  # runtime -> runner
    runtime: str = "torch"  # the runtime it deploys with (its latency is the objective's)
    logits: torch.Tensor | None = None  # test-split logits of the deploy form


class Skipped(Exception):
    """A method that cannot run here; the message is the reason the report gives."""


def original_variant(ctx: Context, file: Path) -> Variant:
    """The original (its checkpoint `file`), scored first: every ratio is against it."""
    logits = ctx.logits(ctx.model)
    entry = {"file": file.name, "format": "torch fp32",
             **ctx.metrics(logits), **ctx.sized(file),
             **ctx.structure(ctx.model), "size_ratio": 1.0, "param_ratio": 1.0,
             "mac_ratio": 1.0, "agreement_with_fp32": 1.0, "deployable": True,
             "candidate": False}
    ctx.set_original(entry, logits)
    return Variant("original", "original", [], entry, model=ctx.model,
                   runners={"torch": eager_runner(ctx.model)}, logits=logits)


def onnx_reference(ctx: Context) -> Variant:
    """The original exported to `model_fp32.onnx` and run by ONNX Runtime: the int8 source
    and a reference row, never a candidate."""
    src = export_onnx(ctx.model, ctx.example, ctx.out / "model_fp32.onnx")
    logits = ctx.logits(OrtModule(src))
    agree = ctx.agreement(logits)
    return Variant("onnx_fp32", "onnx", [{"method": "onnx_export"}], {
        "file": src.name, "format": "onnx fp32 (the original, exported)",
        **ctx.metrics(logits), **ctx.sized(src),
        **{k: ctx.base[k] for k in ("params", "macs")},
        "param_ratio": 1.0, "mac_ratio": 1.0,
        "onnx_agreement": agree,
        "onnx_ok": agree >= ctx.cfg.onnx_min_agreement,
        "agreement_with_fp32": agree,
        "deployable": True, "candidate": False,
        "notes": ["reference row: same network as the original, run by ONNX Runtime"],
    }, onnx=src, runners={"onnx": ort_runner(src)}, runtime="onnx")


def int8_variant(ctx: Context, base: Variant, name: str, src: Path | None = None,
                 since: float | None = None) -> Variant:
    """ORT QDQ int8 of `base`'s ONNX file, or of `src` (for the original: its reference
    export). `since`: when its build started (default: now)."""
    t0 = time.perf_counter() if since is None else since
    src = src or base.onnx
    if src is None:
        raise ValueError(f"{base.name} has no ONNX file to quantize")
    original = base.family == "original"
    path = ctx.out / ("model_int8.onnx" if original else f"{name}.onnx")
    keep, calib = ctx.cfg.int8_keep_first_conv, ctx.calibration()
    quantize_int8_onnx(src, calib, path, keep_first_conv=keep)
    logits = ctx.logits(OrtModule(path))
    step = {"method": "int8", "format": "onnx qdq", "per_channel": True,
            "calibration_images": len(calib), "first_conv_fp32": keep}
    entry = {"file": path.name, "format": "onnx int8 QDQ per-channel",
             **ctx.metrics(logits), **ctx.sized(path),
             **{k: base.entry[k] for k in ("params", "macs")},
             "param_ratio": base.entry.get("param_ratio", 1.0),
             "mac_ratio": base.entry.get("mac_ratio", 1.0),
             "agreement_with_fp32": ctx.agreement(logits),
             "top1_agreement_with_fp32": ctx.agreement(logits),
             "deployable": True, "candidate": True,
             "seconds": round(time.perf_counter() - t0, 2)}
    if not original:
        entry["agreement_with_base"] = ctx.agreement(logits, base.logits)
    return Variant(name, "int8" if original else f"{base.family}+int8", [*base.recipe, step],
                   entry, onnx=path, runners={"onnx": ort_runner(path)}, runtime="onnx",
                   logits=logits)


def torch_variant(ctx: Context, name: str, family: str, recipe: list[dict], model: nn.Module,
                  save: Callable[[Path], None], load: Callable[[Path], nn.Module], fmt: str,
                  extra: dict[str, Any] | None = None, deploy: bool = True) -> Variant:
    """Score an fp32 torch variant, save it, reload it from disk and compare, then (when
    `deploy`) export it to ONNX and re-score it from that file."""
    model = model.eval()
    logits = ctx.logits(model)
    path = ctx.out / f"{name}.pt"
    save(path)
    reload_ok = ctx.same_outputs(model, load(path))
    entry = {"file": path.name, "torch_file": path.name, "format": fmt,
             **ctx.metrics(logits), **ctx.sized(path), **ctx.structure(model),
             "agreement_with_fp32": ctx.agreement(logits), "reload_ok": reload_ok,
             "deployable": False, "candidate": True, **(extra or {})}
    if not reload_ok:
        entry.setdefault("notes", []).append("reloaded weights differ: not deployable")
    v = Variant(name, family, recipe, entry, model=model,
                runners={"torch": eager_runner(model)}, logits=logits)
    if deploy and reload_ok:
        _deploy_onnx(ctx, v)
    return v


def _deploy_onnx(ctx: Context, v: Variant) -> None:
    """Make `v` ONNX-deployed: export `<name>.onnx`, check ORT agrees with PyTorch on the
    test split, re-score from the file, add the ORT runner."""
    path = export_onnx(v.model, ctx.example, ctx.out / f"{v.name}.onnx")
    ort_logits = ctx.logits(OrtModule(path))
    agree = ctx.agreement(ort_logits, v.logits)
    ok = agree >= ctx.cfg.onnx_min_agreement
    top1_torch = v.entry["top1"]
    v.entry.update({"onnx_file": path.name, "onnx_agreement": agree, "onnx_ok": ok})
    v.entry["top1_torch"] = top1_torch
    if ok:
        v.entry.update({"file": path.name, **ctx.metrics(ort_logits), **ctx.sized(path),
                        "agreement_with_fp32": ctx.agreement(ort_logits),
                        "deployable": True, "format": v.entry["format"] + ", ONNX"})
        v.onnx, v.runtime, v.logits = path, "onnx", ort_logits
    else:
        v.entry["deployable"] = False
        v.entry.setdefault("notes", []).append(
            f"ONNX Runtime and PyTorch agree on only {agree:.2%} of the "
            f"test images (< {ctx.cfg.onnx_min_agreement:.0%}): not deployable")
    v.runners["onnx"] = ort_runner(path)


def magnitude_variant(ctx: Context) -> Variant:
    t0 = time.perf_counter()
    amount = ctx.cfg.prune_amount
    pruned, sparsity = magnitude_prune(ctx.model, amount)
    v = torch_variant(
        ctx, "prune", "prune", [{"method": "prune", "kind": "unstructured L1", "amount": amount}],
        pruned, lambda p: save_classifier(p, pruned, ctx.arch),
        lambda p: load_classifier(p)[0], "torch fp32, unstructured sparsity",
        extra={"sparsity": round(sparsity, 4), "notes": [
            "unstructured zeros in dense kernels: no speed-up and no smaller file (the "
            "zeros are stored); latency is measured to show it. Not a deployment "
            "candidate"]}, deploy=False)
    v.entry["note"] = "zeros in dense kernels: no size or speed gain unless stored sparse"
    v.entry["seconds"] = round(time.perf_counter() - t0, 2)
    return v


def structured_variant(ctx: Context, ratio: float) -> Variant:
    t0 = time.perf_counter()
    cfg = ctx.cfg
    name = f"structured{ratio * 100:g}"
    history: list[dict] = []

    def between(model: nn.Module, step: int) -> None:
        history.extend({"step": step + 1, **h} for h in ctx.recover(model, ctx.seed + step))

    pruned = structured_prune(ctx.model, ctx.example, ratio, cfg.structured_steps,
                              between_steps=between)
    arch = asdict(ctx.arch)
    recipe = [{"method": "structured", "ratio": ratio, "steps": cfg.structured_steps,
               "importance": "L2 magnitude", "finetune_epochs": cfg.finetune_epochs,
               "finetune_distill": cfg.finetune_distill}]
    v = torch_variant(
        ctx, name, "structured", recipe, pruned,
        lambda p: save_pruned(p, pruned, arch, recipe=recipe), load_pruned,
        "torch fp32, channel-pruned",
        extra={"expected_mac_ratio": round((1 - ratio) ** 2, 4), "finetune": history})
    v.entry["seconds"] = round(time.perf_counter() - t0, 2)
    return v


def lowrank_variant(ctx: Context, energy: float) -> Variant:
    t0 = time.perf_counter()
    name = f"lowrank{energy * 100:g}"
    factored = factorize_model(ctx.model, energy=energy)
    n_factored = count_factored(factored)
    history = ctx.recover(factored, ctx.seed)
    arch = asdict(ctx.arch)
    recipe = [{"method": "lowrank", "energy": energy, "conv": "tucker2", "linear": "svd",
               "finetune_epochs": ctx.cfg.finetune_epochs,
               "finetune_distill": ctx.cfg.finetune_distill}]
    v = torch_variant(
        ctx, name, "lowrank", recipe, factored,
        lambda p: save_structured(p, factored, arch, recipe=recipe), load_structured,
        "torch fp32, low-rank factorised",
        extra={"factorised_layers": n_factored, "finetune": history})
    v.entry["seconds"] = round(time.perf_counter() - t0, 2)
    return v


def student_variant(ctx: Context) -> Variant:
    t0 = time.perf_counter()
    cfg, a = ctx.cfg, ctx.arch
    torch.manual_seed(ctx.seed)
    net = create_model(cfg.student_model, a.num_classes, a.image_size, a.in_channels,
                       **cfg.student_kwargs)
    student = Classifier(net, a.mean, a.std)
    arch = Arch(name=cfg.student_model, num_classes=a.num_classes, image_size=a.image_size,
                in_channels=a.in_channels, mean=a.mean, std=a.std, classes=a.classes)
    x, y, teacher = ctx.finetune_data()
    t_test = ctx.logits(ctx.model)
    kl_before = float(kl_divergence(ctx.logits(student), t_test, cfg.temperature))
    with on_device(student, ctx.device) as m:
        _, hist = distill(m, None, x, y, epochs=cfg.distill_epochs, lr=cfg.distill_lr,
                          temperature=cfg.temperature, alpha=cfg.distill_alpha,
                          batch_size=cfg.finetune_batch_size, seed=ctx.seed,
                          teacher_logits=teacher)
    kl_after = float(kl_divergence(ctx.logits(student), t_test, cfg.temperature))
    recipe = [{"method": "distill", "student": cfg.student_model,
               "student_kwargs": cfg.student_kwargs, "epochs": cfg.distill_epochs,
               "temperature": cfg.temperature, "alpha": cfg.distill_alpha}]
    arch_d = asdict(arch)
    v = torch_variant(
        ctx, "student", "distill", recipe, student,
        lambda p: save_structured(p, student, arch_d, recipe=recipe), load_structured,
        f"torch fp32, distilled {cfg.student_model} student",
        extra={"kl_to_teacher_before": round(kl_before, 5),
               "kl_to_teacher_after": round(kl_after, 5), "distill": rounded(hist)})
    if v.entry["params"] >= ctx.base["params"]:
        v.entry.setdefault("notes", []).append("the student is not smaller than the teacher")
    v.entry["seconds"] = round(time.perf_counter() - t0, 2)
    return v


def pt2e_variant(ctx: Context) -> Variant:
    """Scored from the graph lowered for the largest latency batch; a recipe file saved."""
    if not pt2e.torchao_available():
        raise Skipped("torchao is not installed")
    t0 = time.perf_counter()
    calib, keep = ctx.calibration(), ctx.cfg.int8_keep_first_conv
    try:
        converted = pt2e.quantize_pt2e_x86(ctx.model, calib, keep_first_conv=keep)
    except Exception as err:  # e.g. a model the X86 quantizer cannot annotate
        raise Skipped(f"PT2E failed: {type(err).__name__}: {err}"[:300]) from err
    path = ctx.out / "pt2e_int8.recipe.pt"
    pt2e.save_recipe(path, ctx.model, asdict(ctx.arch), calib, keep_first_conv=keep)
    lowered: dict[int, nn.Module] = {}

    def graph(batch: int) -> nn.Module:
        if batch not in lowered:
            lowered[batch] = pt2e.lower_x86(converted, batch_of(ctx.example, batch))
        return lowered[batch]

    static = max(ctx.cfg.latency_batches)
    logits = ctx.logits(pt2e.ExportedGraph(graph(static), static))
    ref_logits = ctx.logits(pt2e.ExportedGraph(converted))
    entry = {"file": path.name, "format": "torch int8 PT2E X86Inductor, oneDNN-lowered",
             **ctx.metrics(logits),
             **{k: ctx.base[k] for k in ("params", "macs")},
             "param_ratio": 1.0, "mac_ratio": 1.0,
             "agreement_with_fp32": ctx.agreement(logits),
             "agreement_lowered_vs_reference": ctx.agreement(logits, ref_logits),
             "top1_reference_graph": round(float(
                 (ref_logits.argmax(1) == ctx.test_y).float().mean()), 6),
             "recipe_bytes": path.stat().st_size,
             "deployable": False, "candidate": True,
             "seconds": round(time.perf_counter() - t0, 2),
             "notes": ["measured, not deployable: torch.export.load of the int8 graph "
                       "unpickles (weights_only=False); the saved recipe (fp32 weights + "
                       "calibration images, weights_only) re-derives it with "
                       "compression.pt2e.load_recipe. Lowered per static batch size with "
                       "lower_pt2e_quantized_to_x86; top-1 from the lowered graph"]}
    recipe = [{"method": "pt2e", "quantizer": "X86InductorQuantizer",
               "calibration_images": len(calib), "first_conv_fp32": keep,
               "lowering": "lower_pt2e_quantized_to_x86"}]

    def runner(x: torch.Tensor) -> Callable[[], Any]:
        g = graph(len(x))
        return lambda: g(x)

    return Variant("pt2e_int8", "pt2e", recipe, entry, runners={"pt2e": runner},
                   runtime="pt2e")
