"""The champion/challenger gate: pure decision logic, then the registry moves it implies.

`decide` compares the paired per-image correctness of the challenger and the current
champion on the same test split (both scored by the same code) and promotes only when
every required check holds:

- `floor`:   challenger top-1 >= `register.min_top1` (always required);
- `majority`: challenger top-1 > the share of the test images in their commonest class, what
             answering that class always scores (required when `register.beat_majority`);
- `delta`:   top-1 gain over the champion > 0 and >= `register.min_delta`;
- `mcnemar`: McNemar's exact test on the discordant pairs, p <= `register.alpha`
             (required when `register.mcnemar` is true; reported either way).

With no (scorable) champion only the floor and the majority check apply. `Decision.tags()` and
`Decision.markdown()` carry every check with its numbers; `apply` writes them to the
version and moves the alias (the old champion keeps `previous`).

A fair comparison: `scored_set` keeps only the test images (by sha256) that neither the
challenger nor the champion trained or validated on; the report says how many were left
out and why. With fewer than `register.min_test_images` left, `decide` refuses to promote
(check `test_images`), whatever the scores.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
from scipy.stats import binomtest

from visionflow.core.config import RegisterConfig
from visionflow.mlops import registry

EPS = 1e-12


# the `register:` settings the gate reads (its decision records their values)
GATE_KEYS = ("min_top1", "beat_majority", "min_delta", "mcnemar", "alpha", "min_test_images")


@dataclass
class ScoredSet:
    """The test images the gate scores: those that neither model trained or validated on."""

    total: int
    keep: list[bool]
    challenger_trained: int  # test images in the challenger's train/val sets
    champion_trained: int  # ... in the champion's (and not already counted)
    champion_hashes: str  # "recorded", "no champion", or why they are unknown
    other_classes: int = 0  # ... of classes the champion was not trained on
    new_classes: tuple[str, ...] = ()  # those classes

    @property
    def n(self) -> int:
        return sum(self.keep)

    def of_classes(self, known: Sequence[bool], names: Sequence[str]) -> ScoredSet:
        """Only the images whose class (`known`, one per test image) the champion knows;
        `names`: the classes it does not."""
        keep = [k and ok for k, ok in zip(self.keep, known, strict=True)]
        return replace(self, keep=keep, other_classes=self.n - sum(keep),
                       new_classes=tuple(names))

    @property
    def excluded(self) -> int:
        return self.total - self.n

    def text(self) -> str:
        why = (f"{self.champion_trained} the champion trained or validated on, "
               f"{self.challenger_trained} the challenger did")
        if self.new_classes:
            shown = ", ".join(self.new_classes[:5]) + (", ..." if len(self.new_classes) > 5
                                                       else "")
            why += (f", {self.other_classes} of the {len(self.new_classes)} classes the "
                    f"champion was not trained on: {shown}")
        note = "" if self.champion_hashes in ("recorded", "no champion") else \
            f"; {self.champion_hashes}"
        return f"{self.n} of {self.total} test images scored, {self.excluded} excluded " \
               f"({why}){note}"

    def summary(self) -> dict[str, Any]:
        return {"total": self.total, "scored": self.n, "excluded": self.excluded,
                "challenger_trained": self.challenger_trained,
                "champion_trained": self.champion_trained,
                "champion_hashes": self.champion_hashes, "other_classes": self.other_classes,
                "new_classes": list(self.new_classes), "text": self.text()}


def scored_set(test_hashes: Sequence[str], challenger: Iterable[str],
               champion: Iterable[str] | None, champion_note: str = "no champion") -> ScoredSet:
    """Which test images (by sha256, in test-split order) the gate may score.

    `challenger`/`champion`: the sha256 of the images each trained or validated on;
    `champion` None: unknown (`champion_note` says why) or no champion."""
    own = set(challenger)
    theirs = set(champion) if champion is not None else set()
    keep = [h not in own and h not in theirs for h in test_hashes]
    mine = sum(h in own for h in test_hashes)
    return ScoredSet(len(test_hashes), keep, mine,
                     sum(h in theirs and h not in own for h in test_hashes),
                     "recorded" if champion is not None else champion_note)


@dataclass
class Check:
    name: str
    required: bool
    passed: bool
    detail: str

    @property
    def verdict(self) -> str:
        if not self.required:
            return "pass" if self.passed else "fail"
        return "pass" if self.passed else "FAIL"


@dataclass
class Decision:
    promote: bool
    reason: str
    challenger_top1: float
    champion_version: str | None = None
    champion_top1: float | None = None
    checks: list[Check] = field(default_factory=list)
    n: int = 0
    gain: float | None = None
    mcnemar_p: float | None = None
    only_challenger_right: int | None = None  # McNemar b
    only_champion_right: int | None = None  # McNemar c
    config: dict[str, Any] = field(default_factory=dict)
    scored: dict[str, Any] = field(default_factory=dict)  # ScoredSet.summary()
    metric: str = "top-1"  # what challenger_top1 / champion_top1 hold (segmentation: mIoU)
    champion_note: str = ""  # why a champion was not compared (other inputs, no weights)

    @property
    def label(self) -> str:
        return "promoted" if self.promote else "rejected"

    def tags(self) -> dict[str, str]:
        """Version tags: the decision, its reason and every check with numbers; the scores
        are named by the metric (`gate_challenger_top1`, segmentation's `..._miou`)."""
        key = self.metric.replace("-", "").lower()
        tags = {
            "gate_decision": self.label,
            "gate_reason": self.reason,
            "gate_checks": "; ".join(f"{c.name}: {c.verdict}{'' if c.required else ' (info)'}"
                                     f" - {c.detail}" for c in self.checks),
            f"gate_challenger_{key}": f"{self.challenger_top1:.6f}",
            "gate_champion_version": self.champion_version or "",
            f"gate_champion_{key}": ("" if self.champion_top1 is None
                                     else f"{self.champion_top1:.6f}"),
            "gate_config": ", ".join(f"{k}={v}" for k, v in self.config.items()),
            "gate_test_images": self.scored.get("text", f"{self.n} test images scored"),
            "gate_metric": self.metric,
        }
        if self.mcnemar_p is not None:
            tags["gate_mcnemar_p"] = f"{self.mcnemar_p:.6g}"
        return {k: v[:5000] for k, v in tags.items() if v}  # no empty tags

    def markdown(self, model_name: str = "", version: str | None = None) -> str:
        head = f"## Champion gate: {self.label.upper()}"
        who = f"`{model_name}` version {version}" if version else "the challenger"
        champ = (self.champion_note or "no champion yet" if self.champion_version is None else
                 f"champion v{self.champion_version}, {self.metric} {self.champion_top1:.4f}")
        lines = [
            head, "",
            f"Challenger {who}: {self.metric} {self.challenger_top1:.4f} on {self.n} test "
            f"images; "
            f"{champ}.", "",
            f"Test images: {self.scored.get('text', f'{self.n} scored, none excluded')}.", "",
            "| check | required | result | detail |", "|---|---|---|---|",
        ]
        for c in self.checks:
            lines.append(f"| {c.name} | {'yes' if c.required else 'no'} | {c.verdict} | "
                         f"{c.detail} |")
        lines += ["", f"**Decision: {self.label}.** {self.reason}", "",
                  "Gate settings: " + ", ".join(f"`{k}={v}`" for k, v in self.config.items()),
                  ""]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: binomial test of b successes in b + c at p = 1/2."""
    return 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5).pvalue)


def _bools(x: Any) -> list[bool]:

    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    return [bool(v) for v in np.asarray(x).reshape(-1)]


def first_checks(metric: str, value: float, floor_key: str, floor: float,
                 majority: float | None, beat_majority: bool, baseline: str) -> list[Check]:
    """The checks a first model meets too: the floor, and beating the commonest class
    (`majority`: what `baseline` scores; None: not known, not checked)."""
    ok = value + EPS >= floor
    checks = [Check("floor", True, ok, f"{metric} {value:.4f} {'>=' if ok else '<'} "
                                       f"{floor_key} {floor:.4f}")]
    if majority is not None:
        beats = value > majority + EPS
        checks.append(Check("majority", beat_majority, beats,
                            f"{metric} {value:.4f} {'>' if beats else '<='} {majority:.4f}, "
                            f"what {baseline}"))
    return checks


def first_model(first: list[Check], note: str) -> tuple[bool, str]:
    """(promote, reason) with no champion to beat: `note` says why there is none."""
    reason = note or "no champion yet"
    failed = [k.detail for k in first if k.required and not k.passed]
    return not failed, f"{reason}, but {'; '.join(failed)}" if failed else reason


def delta_check(metric: str, value: float, champion: float, gain: float,
                champion_version: str | None, min_delta: float, adds_classes: bool = False
                ) -> Check:
    """The gain over the champion. A challenger that `adds_classes` (knows classes the
    champion does not; `value` is on the others) may tie: it serves more at no loss."""
    least = -EPS if adds_classes else EPS
    better = gain > least and gain + EPS >= min_delta
    versus = f"{metric} {value:.4f} vs champion v{champion_version} {champion:.4f}"
    if adds_classes:
        versus += " on the classes the champion knows"
    if gain <= least:
        return Check("delta", True, False, f"gain {gain:+.4f} ({versus}): " + (
            "worse" if adds_classes else "not an improvement"))
    cmp = ">=" if better else "<"
    return Check("delta", True, better, f"gain {gain:+.4f} ({versus}) {cmp} min_delta "
                                        f"{min_delta:.4f}")


def decide(challenger_correct: Any, champion_correct: Any | None, cfg: RegisterConfig,
           champion_version: str | None = None, note: str = "",
           scored: ScoredSet | None = None, majority: float | None = None) -> Decision:
    """Gate decision from paired per-image correctness (True = that image is right).

    `champion_correct` None means there is no champion to beat (or it could not be scored;
    `note` then says why, and becomes the reason when the floor holds). `scored`: which
    test images these are (the rest excluded, see `scored_set`); fewer than
    `cfg.min_test_images` of them: refused, nothing else is checked. `majority`: the share
    of these images in their commonest class (None: not known, not checked).
    """
    ch = _bools(challenger_correct)
    n = len(ch)
    top1 = sum(ch) / n if n else 0.0
    config = {k: getattr(cfg, k) for k in GATE_KEYS}
    summary = scored.summary() if scored is not None else {}
    cp_all = _bools(champion_correct) if champion_correct is not None else None
    if cp_all is not None and len(cp_all) != n:
        raise ValueError(f"paired predictions differ in length: {n} vs {len(cp_all)}")
    if n < cfg.min_test_images:
        left = (f"{n} test images left after excluding {scored.excluded} that the champion "
                f"or the challenger trained on" if scored is not None and scored.excluded
                else f"{n} test images")
        detail = f"{left} < register.min_test_images={cfg.min_test_images}"
        champ_top1 = (sum(cp_all) / n if n else 0.0) if cp_all is not None else None
        return Decision(False, f"refused: too few test images to judge: {detail}", top1,
                        champion_version if cp_all is not None else None, champ_top1,
                        [Check("test_images", True, False, detail)], n, config=config,
                        scored=summary)
    first = first_checks("top-1", top1, "min_top1", cfg.min_top1, majority, cfg.beat_majority,
                         "answering the commonest test class always scores")
    if champion_correct is None:
        promote, reason = first_model(first, note)
        return Decision(promote, reason, top1, None, None, first, n, config=config,
                        scored=summary, champion_note=note)

    cp = cp_all
    champ_top1 = sum(cp) / n if n else 0.0
    gain = (sum(ch) - sum(cp)) / n if n else 0.0
    delta = delta_check("top-1", top1, champ_top1, gain, champion_version, cfg.min_delta,
                        bool(scored and scored.new_classes))
    b = sum(1 for x, y in zip(ch, cp, strict=True) if x and not y)
    c = sum(1 for x, y in zip(ch, cp, strict=True) if y and not x)
    p = mcnemar_exact(b, c)
    significant = p <= cfg.alpha and b > c
    favours = ", the champion's way" if p <= cfg.alpha and b <= c else ""
    mc = Check("mcnemar", cfg.mcnemar, significant,
               f"exact p={p:.4g} {'<=' if p <= cfg.alpha else '>'} alpha {cfg.alpha}{favours} "
               f"(b={b} images only the challenger gets right, c={c} only the champion)")
    checks = [*first, delta, mc]
    promote = all(k.passed for k in checks if k.required)
    if promote:
        verb = "matches" if gain <= EPS else "beats"  # a tie: it adds classes
        on = " on the classes the champion knows" if scored and scored.new_classes else ""
        reason = (f"top-1 {top1:.4f}{on} {verb} champion v{champion_version} {champ_top1:.4f} "
                  f"(gain {gain:+.4f} >= min_delta {cfg.min_delta}"
                  + (f", McNemar p={p:.4g} <= {cfg.alpha}" if cfg.mcnemar else "")
                  + (f", top-1 >= floor {cfg.min_top1}" if cfg.min_top1 > 0 else "") + ")")
    else:
        failed = "; ".join(k.detail for k in checks if k.required and not k.passed)
        reason = f"kept champion v{champion_version}: {failed}"
    return Decision(promote, reason, top1, champion_version, champ_top1, checks, n, gain, p,
                    b, c, config, summary)


def apply(client: Any, name: str, version: str, decision: Decision, alias: str = "champion",
          extra_tags: dict[str, str] | None = None, who: str = "gate") -> str | None:
    """Tag the version with the decision; on promotion move `alias` (old holder: `previous`).

    Call it under `registry.registry_lock`. Returns the alias set, or None.
    """

    for k, v in {**(extra_tags or {}), **decision.tags()}.items():
        if v is not None and str(v) != "":  # no empty tags
            client.set_model_version_tag(name, str(version), k, str(v))
    if not decision.promote:
        return None
    registry.set_champion(client, name, str(version), alias=alias, action="gate", by=who,
                          reason=decision.reason)
    return alias
