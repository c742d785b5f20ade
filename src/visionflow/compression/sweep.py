"""The sweep: which variants get built, in which order.

The original first (every ratio is against it), then per `compress.methods`: `int8` of the
original, `prune`, then each family's strengths mildest first (`structured_ratios`,
`lowrank_energies`, one `distill` student). With `stop_at_first_miss` a family's stronger
strengths are skipped once one misses the budget (`max_top1_drop`); with `combine`, int8 on
top of every deployable fp32 variant inside the budget (prune -> int8, ...); `pt2e` last.
A variant that fails is recorded in `skipped` (and printed) instead of failing the sweep, so
one method that does not suit an architecture costs only itself.

Methods register themselves (`@register_method(name, order)`, like `model.zoo`'s models): a
new method is a module in `compression/` with its builder and step, plus its name in
`config.COMPRESS_METHODS` (which validates `compress.methods` before any work).
"""

from __future__ import annotations

import importlib
import pkgutil
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
from visionflow.core.errors import ConfigError


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

    def family(self, ctx: Context, family: str, strengths: list[Any],
               build: Callable[[Any], Variant]) -> None:
        """A method's variants, strengths mildest first: with `stop_at_first_miss` the
        stronger ones are skipped after a miss; with `combine` (and int8 among the methods)
        int8 on top of each deployable one inside the budget."""
        cfg = ctx.cfg
        int8 = cfg.combine and "int8" in cfg.methods
        missed = None
        for strength in strengths:
            if missed is not None:
                self.skip(f"{family}@{strength}",
                          f"stop_at_first_miss: {missed} missed the budget")
                continue
            v = self.attempt(f"{family}@{strength}", lambda s=strength: build(s))
            if v is None:
                continue
            fits = v.entry["top1_drop_points"] <= cfg.max_top1_drop + 1e-9
            if fits and int8 and v.entry["deployable"]:
                self.attempt(f"{v.name}+int8", lambda v=v: int8_variant(ctx, v, f"{v.name}+int8"))
            elif int8:
                self.skip(f"{v.name}+int8", "its base is over budget" if not fits
                          else "its base is not deployable")
            if not fits and cfg.stop_at_first_miss:
                missed = v.name


# ---------------------------------------------------------------------------
# the methods: each registers a step that builds its variants into the sweep

Step = Callable[[Sweep, Context, Variant], None]
_METHODS: dict[str, tuple[int, Step]] = {}


def register_method(name: str, order: int) -> Callable[[Step], Step]:
    """Decorator registering `step(sweep, ctx, original)` as compression method `name`
    (a `compress.methods` value); `order` places it in the sweep (int8 0, prune 10,
    structured 20, lowrank 30, distill 40, pt2e 90). A module of `visionflow.compression`
    that registers a method is found by itself (`registered_methods` imports them all)."""

    def deco(step: Step) -> Step:
        if name in _METHODS:
            raise ValueError(f"compression method '{name}' is already registered")
        _METHODS[name] = (order, step)
        return step

    return deco


def registered_methods() -> list[str]:
    """Every registered method, in sweep order."""
    import visionflow.compression as package

    for mod in pkgutil.iter_modules(package.__path__):  # each registers its own methods
        importlib.import_module(f"{package.__name__}.{mod.name}")
    return sorted(_METHODS, key=lambda n: (_METHODS[n][0], n))


def method_steps(names: list[str]) -> list[tuple[str, Step]]:
    """The steps of `names`, in sweep order; an unknown name: one line naming the known."""
    known = registered_methods()
    unknown = [n for n in names if n not in _METHODS]
    if unknown:
        raise ConfigError(f"compress.methods: unknown method {unknown[0]!r}, choose from "
                          f"{', '.join(known)}")
    return [(n, _METHODS[n][1]) for n in known if n in names]


def build_variants(ctx: Context, original_file: Path) -> Sweep:
    """Build, save (under `ctx.out`) and score every variant `ctx.cfg` asks for."""
    sweep = Sweep()
    original = sweep.add(original_variant(ctx, original_file))
    for _, step in method_steps(list(ctx.cfg.methods)):
        step(sweep, ctx, original)
    return sweep


@register_method("int8", order=0)
def _int8(sweep: Sweep, ctx: Context, original: Variant) -> None:
    t0 = time.perf_counter()  # the original's int8 time counts its reference export
    ref = sweep.attempt("int8", lambda: onnx_reference(ctx))
    if ref is not None:
        sweep.attempt("int8", lambda: int8_variant(ctx, original, "int8", src=ref.onnx,
                                                   since=t0))


@register_method("prune", order=10)
def _prune(sweep: Sweep, ctx: Context, original: Variant) -> None:
    sweep.attempt("prune", lambda: magnitude_variant(ctx))


@register_method("structured", order=20)
def _structured(sweep: Sweep, ctx: Context, original: Variant) -> None:
    sweep.family(ctx, "structured", ctx.cfg.structured_ratios,
                 lambda r: structured_variant(ctx, r))


@register_method("lowrank", order=30)
def _lowrank(sweep: Sweep, ctx: Context, original: Variant) -> None:
    sweep.family(ctx, "lowrank", ctx.cfg.lowrank_energies, lambda e: lowrank_variant(ctx, e))


@register_method("distill", order=40)
def _distill(sweep: Sweep, ctx: Context, original: Variant) -> None:
    sweep.family(ctx, "distill", [None], lambda _: student_variant(ctx))


@register_method("pt2e", order=90)
def _pt2e(sweep: Sweep, ctx: Context, original: Variant) -> None:
    sweep.attempt("pt2e_int8", lambda: pt2e_variant(ctx))
