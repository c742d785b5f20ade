"""Stage 5, compress: search compressed variants of the trained model and pick the best one
inside an accuracy budget.

Variants (`params.yaml` `compress.methods`; strengths and fine-tuning there too):

- `int8`: ONNX export (dynamo), then ONNX Runtime static QDQ int8, per-channel weights,
  calibrated on a train subset (`model_int8.onnx`);
- `prune`: global L1 *unstructured* magnitude pruning. Zeros in dense kernels give no speed-up
  and no smaller file: it is reported, never deployed;
- `structured`: channel pruning with torch-pruning's dependency graph, for each ratio in
  `structured_ratios` (iterative steps, a short fine-tune after each, distilled from the
  unpruned model when `finetune_distill`), saved as layer structure + state dict;
- `lowrank`: Tucker-2 convolutions / SVD linears at each `lowrank_energies`, fine-tuned;
- `distill`: a smaller registry student (`student_model`, `student_kwargs`) trained on the
  original's soft targets plus the labels;
- `pt2e`: torchao PT2E int8 (X86InductorQuantizer), lowered to oneDNN kernels for timing.
  Measured, not deployable (its saved form cannot be loaded without unpickling; a recipe
  that re-derives it is saved instead);
- with `combine`, int8 on top of every fp32 variant inside the budget (prune -> int8, ...).

Fine-tuning and distillation use the augment cache's train split (uint8, optionally a seeded
subset) and run on `train.device` (the GPU when there is one); scoring, export and timing run
on the CPU with `compress.threads` threads. Strengths are tried mildest first; with
`stop_at_first_miss` the stronger ones are skipped once one misses the budget.

Every variant is scored by `evaluate.model_logits` + `evaluate.score_logits` on the same test
split, in the form it deploys in (its ONNX file for every deployable variant; ORT and PyTorch
must agree on >= `onnx_min_agreement` of the test images), and measured for size on disk,
parameters, MACs, CPU latency at each of `latency_batches` (medians, round-robin across
variants, warm-up excluded, threads recorded) and GPU latency when CUDA is present. Every
torch file is reloaded from disk (`weights_only=True`) and checked against the in-memory
model.

The choice: the deployable variant with the lowest `objective` (size | macs | cpu_latency)
whose top-1 drop is at most `max_top1_drop` points and which improves on the original.
Writes `outputs/compress/models/`, `compress.json` (every variant, the Pareto table, the
choice), `pareto.csv`, `pareto.png`; logs them to the pipeline's MLflow run.
`visionflow.mlops.compact.register_compact` registers the choice after `register`.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visionflow.config import CompressConfig, Params
from visionflow.files import atomic_dir, write_json
from visionflow.layout import Layout
from visionflow.stages import main

RELOAD_CHECK_IMAGES = 64

Runner = Callable[[torch.Tensor], Callable[[], Any]]  # input batch -> zero-arg timed call




@dataclass
class Variant:
    name: str
    family: str
    recipe: list[dict[str, Any]]
    entry: dict[str, Any]
    model: nn.Module | None = None  # the torch form (fp32 families)
    onnx: Path | None = None  # the deployable file of ONNX-deployed variants
    runners: dict[str, Runner] = field(default_factory=dict)  # runtime -> runner
    runtime: str = "torch"  # the runtime it deploys with (its latency is the objective's)
    logits: torch.Tensor | None = None  # test-split logits of the deploy form


class _Search:
    """One compress run: the original, the shared data, and every variant built so far."""

    def __init__(self, params: Params, layout: Layout, out: Path) -> None:
        from visionflow.data.cache import load_cache
        from visionflow.model.classifier import load_classifier
        from visionflow.model.inference import pick_device

        self.params, self.cfg, self.layout, self.out = params, params.compress, layout, out
        self.model, self.arch = load_classifier(layout.model)
        self.train_device = pick_device(params.train.device)  # fine-tuning; the rest on CPU
        cache = load_cache(layout.cache)
        self.test_x, self.test_y = cache["test_x"], cache["test_y"]
        self.train_x, self.train_y = cache["train_x"], cache["train_y"]
        self.example = self.test_x[:1].float().div(255)
        self.shape = tuple(self.example.shape)
        self.variants: list[Variant] = []
        self.skipped: list[dict[str, str]] = []
        self.base: dict[str, Any] = {}
        self.base_pred: torch.Tensor | None = None
        self._calib: torch.Tensor | None = None
        self._ft: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None

    # ------------------------------------------------------------------ scoring
    def logits(self, model: nn.Module) -> torch.Tensor:
        from visionflow.model.inference import model_logits

        ev = self.params.evaluate
        return model_logits(model, self.test_x, ev.batch_size, "cpu", ev.tta,
                            self.arch.temperature)  # the parent's calibration for every variant

    def metrics(self, logits: torch.Tensor) -> dict[str, Any]:
        from visionflow.model.metrics import headline, score_logits

        ev = self.params.evaluate
        scores = score_logits(logits, self.test_y, self.arch.classes, ev.topk,
                              ev.calibration_bins)
        out = {"n": scores["n"], **headline(scores)}
        if self.base:
            out["top1_drop"] = round(self.base["top1"] - out["top1"], 6)
            out["top1_drop_points"] = round(100 * (self.base["top1"] - out["top1"]), 4)
        else:
            out["top1_drop"], out["top1_drop_points"] = 0.0, 0.0
        return out

    def agreement(self, logits: torch.Tensor, other: torch.Tensor | None = None) -> float:
        ref = self.base_pred if other is None else other.argmax(1)
        return round(float((logits.argmax(1) == ref).float().mean()), 6)

    def structure(self, model: nn.Module) -> dict[str, Any]:
        from visionflow.compression.measure import count_macs, count_params

        params, macs = count_params(model), count_macs(model, self.shape)
        out: dict[str, Any] = {"params": params, "macs": macs}
        if self.base:
            out["param_ratio"] = round(params / self.base["params"], 4)
            out["mac_ratio"] = round(macs / self.base["macs"], 4)
        return out

    def sized(self, path: Path) -> dict[str, Any]:
        from visionflow.compression.measure import model_size_bytes

        size = model_size_bytes(path)
        out: dict[str, Any] = {"size_bytes": size}
        if self.base:
            out["size_ratio"] = round(size / self.base["size_bytes"], 4)
        return out

    def drop_ok(self, entry: dict[str, Any]) -> bool:
        return entry["top1_drop_points"] <= self.cfg.max_top1_drop + 1e-9

    # ------------------------------------------------------------------ data
    def calibration(self) -> torch.Tensor:
        """A seeded train subset, uint8 (both int8 paths scale it)."""
        if self._calib is None:
            g = torch.Generator().manual_seed(self.params.seed)
            idx = torch.randperm(len(self.train_x), generator=g)[: self.cfg.calibration_images]
            self._calib = self.train_x[idx]
        return self._calib

    def finetune_data(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(x uint8, y, teacher logits or None): the train split (or a seeded subset) and the
        original's logits on it, computed once for every distilled fine-tune."""
        if self._ft is None:
            from visionflow.model.inference import predict_logits

            x, y = self.train_x, self.train_y
            n = self.cfg.finetune_images
            if n is not None and n < len(x):
                g = torch.Generator().manual_seed(self.params.seed + 1)
                idx = torch.randperm(len(x), generator=g)[:n]
                x, y = x[idx], y[idx]
            teacher = None
            if self.cfg.finetune_distill or "distill" in self.cfg.methods:
                with _on(self.model, self.train_device) as model:
                    teacher = predict_logits(model, x)
            self._ft = (x, y, teacher)
        return self._ft

    def recover(self, model: nn.Module, seed: int, distilled: bool | None = None) -> list[dict]:
        """The short fine-tune after a compression step, distilled from the original when
        `finetune_distill`. Returns its per-epoch history."""
        from visionflow.compression.distill import distill, finetune

        cfg = self.cfg
        if cfg.finetune_epochs == 0:
            return []
        x, y, teacher = self.finetune_data()
        distilled = cfg.finetune_distill if distilled is None else distilled
        torch.manual_seed(seed)
        with _on(model, self.train_device) as m:
            if distilled:
                _, hist = distill(m, None, x, y, epochs=cfg.finetune_epochs,
                                  lr=cfg.finetune_lr, temperature=cfg.temperature,
                                  alpha=cfg.distill_alpha, batch_size=cfg.finetune_batch_size,
                                  seed=seed, teacher_logits=teacher)
            else:
                _, hist = finetune(m, x, y, epochs=cfg.finetune_epochs, lr=cfg.finetune_lr,
                                   batch_size=cfg.finetune_batch_size, seed=seed)
        return [{k: round(v, 5) if isinstance(v, float) else v for k, v in h.items()}
                for h in hist]

    # ------------------------------------------------------------------ variants
    def add(self, v: Variant) -> Variant:
        v.entry = {"name": v.name, "family": v.family, "recipe": v.recipe,
                   "runtime": v.runtime, **v.entry}
        self.variants.append(v)
        return v

    def original(self) -> Variant:
        logits = self.logits(self.model)
        self.base_pred = logits.argmax(1)
        entry = {"file": self.layout.model.name, "format": "torch fp32",
                 **self.metrics(logits), **self.sized(self.layout.model),
                 **self.structure(self.model), "size_ratio": 1.0, "param_ratio": 1.0,
                 "mac_ratio": 1.0, "agreement_with_fp32": 1.0, "deployable": True,
                 "candidate": False}
        self.base = dict(entry)
        return self.add(Variant("original", "original", [], entry, model=self.model,
                                runners={"torch": _eager(self.model)}, logits=logits))

    def onnx_of(self, v: Variant, name: str) -> tuple[Path, torch.Tensor, dict[str, Any]]:
        """Export `v.model` to `<name>.onnx`, score the file with ORT, check it agrees with
        PyTorch on the test split."""
        from visionflow.compression.onnx_export import OrtModule, export_onnx

        path = export_onnx(v.model, self.example, self.out / f"{name}.onnx")
        ort_logits = self.logits(OrtModule(path))
        torch_logits = v.logits if v.logits is not None else self.logits(v.model)
        agree = self.agreement(ort_logits, torch_logits)
        return path, ort_logits, {"onnx_file": path.name, "onnx_agreement": agree,
                                  "onnx_ok": agree >= self.cfg.onnx_min_agreement}

    def deploy_onnx(self, v: Variant, stem: str) -> None:
        """Make `v` ONNX-deployed: export, re-score from the file, add the ORT runner."""
        path, ort_logits, check = self.onnx_of(v, stem)
        top1_torch = v.entry["top1"]
        v.entry.update(check)
        v.entry["top1_torch"] = top1_torch
        if check["onnx_ok"]:
            v.entry.update({"file": path.name, **self.metrics(ort_logits), **self.sized(path),
                            "agreement_with_fp32": self.agreement(ort_logits),
                            "deployable": True, "format": v.entry["format"] + ", ONNX"})
            v.onnx, v.runtime, v.logits = path, "onnx", ort_logits
        else:
            v.entry["deployable"] = False
            v.entry.setdefault("notes", []).append(
                f"ONNX Runtime and PyTorch agree on only {check['onnx_agreement']:.2%} of the "
                f"test images (< {self.cfg.onnx_min_agreement:.0%}): not deployable")
        v.runners["onnx"] = _ort(path)

    def torch_variant(self, name: str, family: str, recipe: list[dict], model: nn.Module,
                      save: Callable[[Path], None], load: Callable[[Path], nn.Module],
                      fmt: str, extra: dict[str, Any] | None = None,
                      deploy: bool = True) -> Variant:
        """Score an fp32 torch variant, save it, reload it from disk and compare, then (when
        `deploy`) export it to ONNX and re-score it from that file."""
        model = model.eval()
        logits = self.logits(model)
        path = self.out / f"{name}.pt"
        save(path)
        reload_ok = _same_outputs(model, load(path), self.test_x[:RELOAD_CHECK_IMAGES])
        entry = {"file": path.name, "torch_file": path.name, "format": fmt,
                 **self.metrics(logits), **self.sized(path), **self.structure(model),
                 "agreement_with_fp32": self.agreement(logits), "reload_ok": reload_ok,
                 "deployable": False, "candidate": True, **(extra or {})}
        if not reload_ok:
            entry.setdefault("notes", []).append("reloaded weights differ: not deployable")
        v = Variant(name, family, recipe, entry, model=model, runners={"torch": _eager(model)},
                    logits=logits)
        if deploy and reload_ok:
            self.deploy_onnx(v, name)
        return self.add(v)

    def int8_of(self, base: Variant, name: str) -> Variant | None:
        """ORT QDQ int8 of `base`'s ONNX export (the original's when base is the original)."""
        from visionflow.compression.onnx_export import OrtModule, export_onnx
        from visionflow.compression.quantize import quantize_int8_onnx

        t0 = time.perf_counter()
        src = base.onnx
        if src is None:  # the original: export it once, keep it as a reference row
            src = export_onnx(base.model, self.example, self.out / "model_fp32.onnx")
            ref_logits = self.logits(OrtModule(src))
            self.add(Variant("onnx_fp32", "onnx", [{"method": "onnx_export"}], {
                "file": src.name, "format": "onnx fp32 (the original, exported)",
                **self.metrics(ref_logits), **self.sized(src),
                **{k: self.base[k] for k in ("params", "macs")},
                "param_ratio": 1.0, "mac_ratio": 1.0,
                "onnx_agreement": self.agreement(ref_logits),
                "onnx_ok": self.agreement(ref_logits) >= self.cfg.onnx_min_agreement,
                "agreement_with_fp32": self.agreement(ref_logits),
                "deployable": True, "candidate": False,
                "notes": ["reference row: same network as the original, run by ONNX Runtime"],
            }, onnx=src, runners={"onnx": _ort(src)}, runtime="onnx"))
        path = self.out / ("model_int8.onnx" if base.family == "original" else f"{name}.onnx")
        keep = self.cfg.int8_keep_first_conv
        quantize_int8_onnx(src, self.calibration(), path, keep_first_conv=keep)
        logits = self.logits(OrtModule(path))
        step = {"method": "int8", "format": "onnx qdq", "per_channel": True,
                "calibration_images": len(self.calibration()), "first_conv_fp32": keep}
        entry = {"file": path.name, "format": "onnx int8 QDQ per-channel",
                 **self.metrics(logits), **self.sized(path),
                 **{k: base.entry[k] for k in ("params", "macs")},
                 "param_ratio": base.entry.get("param_ratio", 1.0),
                 "mac_ratio": base.entry.get("mac_ratio", 1.0),
                 "agreement_with_fp32": self.agreement(logits),
                 "top1_agreement_with_fp32": self.agreement(logits),
                 "deployable": True, "candidate": True,
                 "seconds": round(time.perf_counter() - t0, 2)}
        if base.family != "original":
            entry["agreement_with_base"] = self.agreement(logits, base.logits)
        return self.add(Variant(name, "int8" if base.family == "original"
                                else f"{base.family}+int8",
                                [*base.recipe, step], entry, onnx=path,
                                runners={"onnx": _ort(path)}, runtime="onnx", logits=logits))

    def magnitude(self) -> Variant:
        from visionflow.compression.prune import magnitude_prune
        from visionflow.model.classifier import load_classifier, save_classifier

        t0 = time.perf_counter()
        amount = self.cfg.prune_amount
        pruned, sparsity = magnitude_prune(self.model, amount)
        v = self.torch_variant(
            "prune", "prune", [{"method": "prune", "kind": "unstructured L1", "amount": amount}],
            pruned, lambda p: save_classifier(p, pruned, self.arch),
            lambda p: load_classifier(p)[0], "torch fp32, unstructured sparsity",
            extra={"sparsity": round(sparsity, 4), "notes": [
                "unstructured zeros in dense kernels: no speed-up and no smaller file (the "
                "zeros are stored); latency is measured to show it. Not a deployment "
                "candidate"]}, deploy=False)
        v.entry["note"] = "zeros in dense kernels: no size or speed gain unless stored sparse"
        v.entry["seconds"] = round(time.perf_counter() - t0, 2)
        return v

    def structured(self, ratio: float) -> Variant:
        from visionflow.compression.prune import load_pruned, save_pruned, structured_prune

        t0 = time.perf_counter()
        cfg = self.cfg
        name = f"structured{ratio * 100:g}"
        history: list[dict] = []

        def between(model: nn.Module, step: int) -> None:
            history.extend({"step": step + 1, **h}
                           for h in self.recover(model, self.params.seed + step))

        pruned = structured_prune(self.model, self.example, ratio, cfg.structured_steps,
                                  between_steps=between)
        arch = asdict(self.arch)
        recipe = [{"method": "structured", "ratio": ratio, "steps": cfg.structured_steps,
                   "importance": "L2 magnitude", "finetune_epochs": cfg.finetune_epochs,
                   "finetune_distill": cfg.finetune_distill}]
        v = self.torch_variant(
            name, "structured", recipe, pruned,
            lambda p: save_pruned(p, pruned, arch, recipe=recipe), load_pruned,
            "torch fp32, channel-pruned",
            extra={"expected_mac_ratio": round((1 - ratio) ** 2, 4), "finetune": history})
        v.entry["seconds"] = round(time.perf_counter() - t0, 2)
        return v

    def lowrank(self, energy: float) -> Variant:
        from visionflow.compression.lowrank import factorize_model
        from visionflow.compression.structure import load_structured, save_structured

        t0 = time.perf_counter()
        name = f"lowrank{energy * 100:g}"
        factored = factorize_model(self.model, energy=energy)
        n_factored = sum(isinstance(m, nn.Sequential) and _is_factored(m)
                         for m in factored.modules())
        history = self.recover(factored, self.params.seed)
        arch = asdict(self.arch)
        recipe = [{"method": "lowrank", "energy": energy, "conv": "tucker2", "linear": "svd",
                   "finetune_epochs": self.cfg.finetune_epochs,
                   "finetune_distill": self.cfg.finetune_distill}]
        v = self.torch_variant(
            name, "lowrank", recipe, factored,
            lambda p: save_structured(p, factored, arch, recipe=recipe), load_structured,
            "torch fp32, low-rank factorised",
            extra={"factorised_layers": n_factored, "finetune": history})
        v.entry["seconds"] = round(time.perf_counter() - t0, 2)
        return v

    def student(self) -> Variant:
        from visionflow.compression.distill import distill, kl_divergence
        from visionflow.compression.structure import load_structured, save_structured
        from visionflow.model.classifier import Arch, Classifier
        from visionflow.model.zoo import create_model

        t0 = time.perf_counter()
        cfg, a = self.cfg, self.arch
        torch.manual_seed(self.params.seed)
        net = create_model(cfg.student_model, a.num_classes, a.image_size, a.in_channels,
                           **cfg.student_kwargs)
        student = Classifier(net, a.mean, a.std)
        arch = Arch(name=cfg.student_model, num_classes=a.num_classes, image_size=a.image_size,
                    in_channels=a.in_channels, mean=a.mean, std=a.std, classes=a.classes)
        x, y, teacher = self.finetune_data()
        t_test = self.logits(self.model)
        kl_before = float(kl_divergence(self.logits(student), t_test, cfg.temperature))
        with _on(student, self.train_device) as m:
            _, hist = distill(m, None, x, y, epochs=cfg.distill_epochs, lr=cfg.distill_lr,
                              temperature=cfg.temperature, alpha=cfg.distill_alpha,
                              batch_size=cfg.finetune_batch_size, seed=self.params.seed,
                              teacher_logits=teacher)
        kl_after = float(kl_divergence(self.logits(student), t_test, cfg.temperature))
        recipe = [{"method": "distill", "student": cfg.student_model,
                   "student_kwargs": cfg.student_kwargs, "epochs": cfg.distill_epochs,
                   "temperature": cfg.temperature, "alpha": cfg.distill_alpha}]
        arch_d = asdict(arch)
        v = self.torch_variant(
            "student", "distill", recipe, student,
            lambda p: save_structured(p, student, arch_d, recipe=recipe), load_structured,
            f"torch fp32, distilled {cfg.student_model} student",
            extra={"kl_to_teacher_before": round(kl_before, 5),
                   "kl_to_teacher_after": round(kl_after, 5),
                   "distill": [{k: round(v, 5) if isinstance(v, float) else v
                                for k, v in h.items()} for h in hist]})
        if v.entry["params"] >= self.base["params"]:
            v.entry.setdefault("notes", []).append("the student is not smaller than the teacher")
        v.entry["seconds"] = round(time.perf_counter() - t0, 2)
        return v

    def pt2e(self) -> Variant | None:
        from visionflow.compression import pt2e
        from visionflow.compression.measure import batch_of

        if not pt2e.torchao_available():
            self.skipped.append({"name": "pt2e_int8", "reason": "torchao is not installed"})
            return None
        t0 = time.perf_counter()
        calib, keep = self.calibration(), self.cfg.int8_keep_first_conv
        try:
            converted = pt2e.quantize_pt2e_x86(self.model, calib, keep_first_conv=keep)
        except Exception as err:  # e.g. a model the X86 quantizer cannot annotate
            self.skipped.append({"name": "pt2e_int8",
                                 "reason": f"PT2E failed: {type(err).__name__}: {err}"[:300]})
            return None
        path = self.out / "pt2e_int8.recipe.pt"
        pt2e.save_recipe(path, self.model, asdict(self.arch), calib, keep_first_conv=keep)
        lowered: dict[int, nn.Module] = {}

        def graph(batch: int) -> nn.Module:
            if batch not in lowered:
                lowered[batch] = pt2e.lower_x86(converted, batch_of(self.example, batch))
            return lowered[batch]

        static = max(self.cfg.latency_batches)
        logits = self.logits(_Graph(graph(static), static))
        ref_logits = self.logits(_Graph(converted))
        entry = {"file": path.name, "format": "torch int8 PT2E X86Inductor, oneDNN-lowered",
                 **self.metrics(logits),
                 **{k: self.base[k] for k in ("params", "macs")},
                 "param_ratio": 1.0, "mac_ratio": 1.0,
                 "agreement_with_fp32": self.agreement(logits),
                 "agreement_lowered_vs_reference": self.agreement(logits, ref_logits),
                 "top1_reference_graph": round(float(
                     (ref_logits.argmax(1) == self.test_y).float().mean()), 6),
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

        return self.add(Variant("pt2e_int8", "pt2e", recipe, entry,
                                runners={"pt2e": runner}, runtime="pt2e"))

    # ------------------------------------------------------------------ search
    def attempt(self, name: str, build: Callable[[], Variant | None]) -> Variant | None:
        """Build one variant; a failure is recorded in `skipped` (and printed) instead of
        failing the stage, so one method that does not suit an architecture costs only
        itself."""
        try:
            return build()
        except Exception as err:  # any method may not suit some architecture
            reason = f"failed: {type(err).__name__}: {err}".replace("\n", " ")[:500]
            print(f"compress: {name} {reason}")
            self.skipped.append({"name": name, "reason": reason})
            return None

    def run(self) -> None:
        cfg = self.cfg
        methods = set(cfg.methods)
        original = self.original()
        if "int8" in methods:
            self.attempt("int8", lambda: self.int8_of(original, "int8"))
        if "prune" in methods:
            self.attempt("prune", self.magnitude)
        families: list[tuple[str, list[Any], Callable[[Any], Variant]]] = []
        if "structured" in methods:
            families.append(("structured", cfg.structured_ratios, self.structured))
        if "lowrank" in methods:
            families.append(("lowrank", cfg.lowrank_energies, self.lowrank))
        if "distill" in methods:
            families.append(("distill", [None], lambda _: self.student()))
        for family, strengths, build in families:
            missed = None
            for strength in strengths:
                if missed is not None:
                    self.skipped.append({"name": f"{family}@{strength}",
                                         "reason": f"stop_at_first_miss: {missed} missed the "
                                                   "budget"})
                    continue
                v = self.attempt(f"{family}@{strength}", lambda b=build, s=strength: b(s))
                if v is None:
                    continue
                fits = self.drop_ok(v.entry)
                if fits and cfg.combine and "int8" in methods and v.entry["deployable"]:
                    self.attempt(f"{v.name}+int8", lambda v=v: self.int8_of(v, f"{v.name}+int8"))
                elif cfg.combine and "int8" in methods:
                    self.skipped.append({"name": f"{v.name}+int8", "reason": (
                        "its base is over budget" if not fits else "its base is not deployable")})
                if not fits and cfg.stop_at_first_miss:
                    missed = v.name
        if "pt2e" in methods:
            self.attempt("pt2e_int8", self.pt2e)


@contextlib.contextmanager
def _on(model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """`model` moved (in place) to `device` for the block, then back to the CPU."""
    try:
        yield model.to(device)
    finally:
        model.cpu()


def _is_factored(m: nn.Sequential) -> bool:
    layers = list(m)
    return (len(layers) == 2 and all(isinstance(x, nn.Linear) for x in layers)) or (
        len(layers) == 3 and all(isinstance(x, nn.Conv2d) for x in layers))


class _Graph(nn.Module):
    """An exported / lowered graph behind the plain module interface: `eval()` / `train()`
    are no-ops (exported graphs refuse them), and with `batch` a graph lowered for one static
    batch size runs any batch in chunks, the last one padded."""

    def __init__(self, graph: nn.Module, batch: int | None = None) -> None:
        super().__init__()
        self.graph, self.batch = graph, batch

    def train(self, mode: bool = True) -> _Graph:
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch is None:
            return self.graph(x)
        outs = []
        for i in range(0, len(x), self.batch):
            chunk = x[i : i + self.batch]
            n = len(chunk)
            if n < self.batch:
                pad = chunk[-1:].expand(self.batch - n, *chunk.shape[1:])
                chunk = torch.cat([chunk, pad])
            outs.append(self.graph(chunk)[:n])
        return torch.cat(outs)


def _eager(model: nn.Module) -> Runner:
    return lambda x: (lambda: model(x))


def _ort(path: Path) -> Runner:
    from visionflow.compression.onnx_export import OrtClassifier

    clf = OrtClassifier(path)  # intra-op threads = torch.get_num_threads()

    def make(x: torch.Tensor) -> Callable[[], Any]:
        feed = {clf.input_name: x.numpy()}
        return lambda: clf.session.run(None, feed)

    return make


@torch.inference_mode()
def _same_outputs(a: nn.Module, b: nn.Module, x_uint8: torch.Tensor) -> bool:
    from visionflow.model.inference import predict_logits

    return torch.allclose(predict_logits(a, x_uint8), predict_logits(b, x_uint8),
                          rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------- latency


def _measure_latency(search: _Search) -> None:
    """CPU latency of every variant in every runtime it has, per batch size, round-robin
    (one call each per round) so load on a shared CPU hits all alike; GPU when present."""
    from visionflow.compression.measure import batch_of, cuda_available, interleaved_latency_ms

    cfg = search.cfg
    threads = torch.get_num_threads()
    with torch.inference_mode():
        for b in cfg.latency_batches:
            x = batch_of(search.example, b)
            runners = {f"{v.name}|{rt}": make(x) for v in search.variants
                       for rt, make in v.runners.items()}
            reps = cfg.latency_reps if b == 1 else cfg.latency_reps_large
            results = interleaved_latency_ms(runners, reps, cfg.latency_warmup, threads)
            for v in search.variants:
                for rt in v.runners:
                    r = results[f"{v.name}|{rt}"]
                    cpu = v.entry.setdefault("latency", {}).setdefault("cpu", {})
                    cpu.setdefault(rt, {})[f"b{b}"] = {
                        "median_ms": round(r["median_ms"], 4), "p90_ms": round(r["p90_ms"], 4),
                        "threads": r["threads"], "reps": r["reps"]}
        if cuda_available():
            _measure_gpu(search)
    base = search.variants[0].entry["latency"]["cpu"]["torch"]
    big = max(cfg.latency_batches)
    for v in search.variants:
        cpu = v.entry["latency"]["cpu"]
        own = cpu.get(v.runtime) or next(iter(cpu.values()))
        v.entry["cpu_b1_ms"] = own["b1"]["median_ms"]
        v.entry[f"cpu_b{big}_ms"] = own[f"b{big}"]["median_ms"]
        v.entry["speedup_b1_vs_fp32_eager"] = round(base["b1"]["median_ms"]
                                                    / own["b1"]["median_ms"], 3)
        if "torch" in cpu and v.runtime != "torch":
            v.entry["torch_b1_ms"] = cpu["torch"]["b1"]["median_ms"]
        gpu = (v.entry["latency"].get("gpu") or {}).get("torch")
        if gpu:
            v.entry["gpu_b1_ms"] = gpu["b1"]["median_ms"]
    if "cpu_b32_ms" not in search.variants[0].entry:  # the table's column
        for v in search.variants:
            v.entry["cpu_b32_ms"] = None


def _measure_gpu(search: _Search, device: str = "cuda") -> None:
    """Eager latency of every torch variant on `device` (a CUDA device; synchronised after
    each call), round-robin like the CPU timing, into `latency.gpu.torch.b<N>`."""
    from visionflow.compression.measure import batch_of, interleaved_latency_ms

    cfg = search.cfg
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    models = {v.name: copy.deepcopy(v.model).to(dev).eval() for v in search.variants
              if v.model is not None}
    name = torch.cuda.get_device_name(dev) if cuda else str(dev)
    for b in cfg.latency_batches:
        x = batch_of(search.example, b).to(dev)

        def call(m: nn.Module, x: torch.Tensor = x) -> Callable[[], Any]:
            return lambda: (m(x), torch.cuda.synchronize(dev) if cuda else None)

        reps = cfg.latency_reps if b == 1 else cfg.latency_reps_large
        results = interleaved_latency_ms({n: call(m) for n, m in models.items()}, reps,
                                         cfg.latency_warmup)
        for v in search.variants:
            if v.name in results:
                r = results[v.name]
                gpu = v.entry.setdefault("latency", {}).setdefault("gpu", {})
                gpu.setdefault("torch", {})[f"b{b}"] = {
                    "median_ms": round(r["median_ms"], 4), "p90_ms": round(r["p90_ms"], 4),
                    "reps": r["reps"], "device": name}
    del models
    if cuda:
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------- the stage


def environment() -> dict[str, Any]:
    import onnxruntime

    from visionflow.env import cpu_name

    return {"cpu": cpu_name(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def run(params: Params, layout: Layout) -> dict[str, Any]:
    from visionflow.compression import pareto as pick

    t0 = time.perf_counter()
    cfg = params.compress
    threads_before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        with atomic_dir(layout.compress_models) as out:
            s = _Search(params, layout, out)
            s.run()
            _measure_latency(s)
            env = environment()
    finally:
        torch.set_num_threads(threads_before)

    rows = [v.entry for v in s.variants]
    selected, reason = pick.choose(rows, rows[0], cfg.objective, cfg.max_top1_drop)
    pick.mark(rows, cfg.max_top1_drop, selected)
    for v in s.variants:  # files now live in the final models dir
        v.entry["path"] = v.entry["file"]
    report = _report(cfg, s, selected, reason, env, time.perf_counter() - t0)
    pick.write_csv(layout.pareto_csv, rows)
    pick.plot(layout.pareto_png, rows, s.base["top1"], cfg.max_top1_drop, selected)
    write_json(layout.compress_report, report)
    _log(layout, report)
    print(_summary_line(report))
    return report


def _report(cfg: CompressConfig, s: _Search, selected: str | None, reason: str,
            env: dict[str, Any], seconds: float) -> dict[str, Any]:
    from visionflow.compression.pareto import table_rows

    variants = {v.name: v.entry for v in s.variants[1:]}
    chosen = None
    if selected is not None:
        e = variants[selected]
        chosen = {"name": selected, "file": e["file"], "runtime": e["runtime"],
                  "recipe": e["recipe"], "top1": e["top1"],
                  "top1_drop_points": e["top1_drop_points"], "size_bytes": e["size_bytes"],
                  "size_ratio": e.get("size_ratio"), "macs": e["macs"],
                  "mac_ratio": e.get("mac_ratio"), "cpu_b1_ms": e["cpu_b1_ms"],
                  "speedup_b1_vs_fp32_eager": e["speedup_b1_vs_fp32_eager"]}
    return {
        "objective": cfg.objective,
        "max_top1_drop": cfg.max_top1_drop,
        "budget_top1": round(s.base["top1"] - cfg.max_top1_drop / 100, 6),
        "selected": chosen,
        "selected_reason": reason,
        "recommended": selected or "original",
        "recommended_reason": reason,
        "original": s.variants[0].entry,
        "variants": variants,
        "skipped": s.skipped,
        "pareto": table_rows([v.entry for v in s.variants]),
        "environment": env,
        "notes": [
            "top-1 drop in points (percent); every variant scored in its deploy form on the "
            "test split by evaluate.model_logits + score_logits",
            "latency: medians of round-robin timing on this machine, warm-up excluded; "
            "`runtime` says which runtime a variant deploys with (torch eager or ONNX Runtime)",
            "the choice is made on the test split, the split every number here is scored on",
        ],
        "seconds": round(seconds, 2),
    }


def _metric_name(text: str) -> str:
    return re.sub(r"[^\w\-. /]", "_", text)


def _log(layout: Layout, report: dict[str, Any]) -> None:
    from visionflow.mlops import tracking

    with tracking.stage_run(layout):
        import mlflow

        metrics: dict[str, float] = {}
        for name, v in report["variants"].items():
            key = _metric_name(name)
            for field_ in ("top1", "size_ratio", "mac_ratio", "cpu_b1_ms"):
                if isinstance(v.get(field_), int | float):
                    metrics[f"compress_{key}_{field_}"] = float(v[field_])
        sel = report["selected"]
        if sel:
            metrics.update({f"compress_selected_{k}": float(sel[k]) for k in
                            ("top1", "top1_drop_points", "size_ratio", "mac_ratio",
                             "cpu_b1_ms", "speedup_b1_vs_fp32_eager")
                            if isinstance(sel.get(k), int | float)})
        mlflow.log_metrics(metrics)
        mlflow.set_tags({"compress_selected": sel["name"] if sel else "none",
                         "compress_objective": report["objective"],
                         "compress_reason": report["selected_reason"][:5000]})
        for path in (layout.compress_report, layout.pareto_csv, layout.pareto_png):
            mlflow.log_artifact(str(path), "compress")


def _summary_line(report: dict[str, Any]) -> str:
    sel = report["selected"]
    if not sel:
        return f"compress: nothing selected ({report['selected_reason']})"
    return (f"compress: selected {sel['name']} ({report['objective']}): "
            f"{sel['size_bytes'] / 1e6:.2f} MB ({sel['size_ratio']}x), "
            f"{sel['mac_ratio']}x MACs, CPU b1 {sel['cpu_b1_ms']:.2f} ms "
            f"({sel['speedup_b1_vs_fp32_eager']}x fp32 eager), top-1 {sel['top1']:.4f} "
            f"({sel['top1_drop_points']:+.2f} pt)")


if __name__ == "__main__":
    main("compress", run)
