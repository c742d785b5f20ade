"""The sweep: which variants get built, in which order.

The original first (every ratio is against it), then per `compress.methods`: `int8` of the
original, `prune`, then each family's strengths mildest first (`structured_ratios`,
`lowrank_energies`, one `distill` student). With `stop_at_first_miss` a family's stronger
strengths are skipped once one misses the budget (`max_top1_drop`); with `combine`, int8 on
top of every deployable fp32 variant inside the budget (prune -> int8, ...); `pt2e` last.
A variant that fails is recorded in `skipped` (and printed) instead of failing the sweep, so
one method that does not suit an architecture costs only itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visionflow.compression.context import Context
from visionflow.compression.variants import (
    Skipped,
    Variant,
    int8_variant,
    lowrank_variant,
    magnitude_variant,
    onnx_reference,
    original_variant,
    pt2e_variant,
    structured_variant,
    student_variant,
)


@dataclass
class Sweep:
    """Every variant built (the original first) and every one skipped, with why."""

    variants: list[Variant] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)

    def add(self, v: Variant) -> Variant:
        """Append `v`, its report row led by name, family, recipe and runtime."""
        v.entry = {"name": v.name, "family": v.family, "recipe": v.recipe,
                   "runtime": v.runtime, **v.entry}
        self.variants.append(v)
        return v

    def skip(self, name: str, reason: str) -> None:
        self.skipped.append({"name": name, "reason": reason})

    def attempt(self, name: str, build: Callable[[], Variant]) -> Variant | None:
        """Build and add one variant; None (and a `skipped` row) when it cannot be built."""
        try:
            return self.add(build())
        except Skipped as why:
            self.skip(name, str(why))
        except Exception as err:  # any method may not suit some architecture
            reason = f"failed: {type(err).__name__}: {err}".replace("\n", " ")[:500]
            print(f"compress: {name} {reason}")
            self.skip(name, reason)
        return None


def build_variants(ctx: Context, original_file: Path) -> Sweep:
    """Build, save (under `ctx.out`) and score every variant `ctx.cfg` asks for."""
    cfg = ctx.cfg
    methods = set(cfg.methods)
    sweep = Sweep()
    original = sweep.add(original_variant(ctx, original_file))
    if "int8" in methods:
        t0 = time.perf_counter()  # the original's int8 time counts its reference export
        ref = sweep.attempt("int8", lambda: onnx_reference(ctx))
        if ref is not None:
            sweep.attempt("int8", lambda: int8_variant(ctx, original, "int8", src=ref.onnx,
                                                       since=t0))
    if "prune" in methods:
        sweep.attempt("prune", lambda: magnitude_variant(ctx))
    families: list[tuple[str, list[Any], Callable[[Any], Variant]]] = []
    if "structured" in methods:
        families.append(("structured", cfg.structured_ratios,
                         lambda r: structured_variant(ctx, r)))
    if "lowrank" in methods:
        families.append(("lowrank", cfg.lowrank_energies, lambda e: lowrank_variant(ctx, e)))
    if "distill" in methods:
        families.append(("distill", [None], lambda _: student_variant(ctx)))
    for family, strengths, build in families:
        missed = None
        for strength in strengths:
            if missed is not None:
                sweep.skip(f"{family}@{strength}",
                           f"stop_at_first_miss: {missed} missed the budget")
                continue
            v = sweep.attempt(f"{family}@{strength}", lambda b=build, s=strength: b(s))
            if v is None:
                continue
            fits = v.entry["top1_drop_points"] <= cfg.max_top1_drop + 1e-9
            if fits and cfg.combine and "int8" in methods and v.entry["deployable"]:
                sweep.attempt(f"{v.name}+int8",
                              lambda v=v: int8_variant(ctx, v, f"{v.name}+int8"))
            elif cfg.combine and "int8" in methods:
                sweep.skip(f"{v.name}+int8", "its base is over budget" if not fits
                           else "its base is not deployable")
            if not fits and cfg.stop_at_first_miss:
                missed = v.name
    if "pt2e" in methods:
        sweep.attempt("pt2e_int8", lambda: pt2e_variant(ctx))
    return sweep

