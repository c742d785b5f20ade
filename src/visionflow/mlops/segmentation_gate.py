"""The champion gate for segmentation: the same rules as classification's (`gate.decide`:
too few test images refused, floor, delta, then `gate.apply` moves the alias and keeps
`previous` for rollback), on mIoU, with the paired per-image IoU test (`paired_iou`,
Wilcoxon or bootstrap) in McNemar's place.

- `test_images`: at least `register.min_test_images` scored images;
- `floor`:  challenger mIoU >= `segmentation.min_miou`;
- `majority`: challenger mIoU > predicting the commonest class at every pixel scores
  (required when `register.beat_majority`);
- `delta`:  mIoU gain over the champion > 0 and >= `register.min_delta`;
- `paired`: one-sided paired test of per-image IoU, p <= `register.alpha` (required when
  `segmentation.paired_required`).

`check_task` refuses, in one line, to compare or register across tasks: a version's `task`
tag (none = classification, registered before tasks existed) must be the project's.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from visionflow.core.errors import ConfigError
from visionflow.mlops.gate import (
    Check,
    Decision,
    ScoredSet,
    delta_check,
    first_checks,
    first_model,
)
from visionflow.mlops.paired_iou import paired_iou_test

METRIC = "mIoU"


def version_task(tags: dict[str, str] | None) -> str:
    return (tags or {}).get("task") or "classification"


def check_task(model_name: str, version: str, tags: dict[str, str] | None,
               task: str) -> None:
    """One-line ConfigError when registered version `version` is a model of another task."""
    theirs = version_task(tags)
    if theirs != task:
        raise ConfigError(f"{model_name} v{version} is a {theirs} model; this project's task "
                          f"is {task}: a {theirs} model cannot be compared with or replaced "
                          f"by a {task} model (set register.model_name to another name)")


def decide_iou(challenger_miou: float, challenger_iou: Any, champion_miou: float | None,
               champion_iou: Any | None, params: Any, champion_version: str | None = None,
               note: str = "", scored: ScoredSet | None = None,
               majority: float | None = None) -> Decision:
    """Decision from the mIoU of both models on the scored test images and their paired
    per-image IoU. `champion_iou` None: no (scorable) champion, only the floor and the
    majority check apply; `majority`: the commonest class everywhere's mIoU (None: unknown)."""
    reg, seg = params.register_, params.segmentation
    n = len(challenger_iou)
    config = {"min_miou": seg.min_miou, "beat_majority": reg.beat_majority,
              "min_delta": reg.min_delta,
              "paired_test": seg.paired_test, "paired_required": seg.paired_required,
              "alpha": reg.alpha, "min_test_images": reg.min_test_images}
    summary = scored.summary() if scored is not None else {}
    common = {"config": config, "scored": summary, "metric": METRIC}
    if n < reg.min_test_images:
        detail = f"{n} test images < register.min_test_images={reg.min_test_images}"
        if scored is not None and scored.excluded:
            detail += f" ({scored.excluded} excluded: trained on by a model)"
        return Decision(False, f"refused: too few test images to judge: {detail}",
                        challenger_miou, champion_version, champion_miou,
                        [Check("test_images", True, False, detail)], n, **common)
    first = first_checks("mIoU", challenger_miou, "min_miou", seg.min_miou, majority,
                         reg.beat_majority, "predicting the commonest class at every pixel scores")
    if champion_iou is None or champion_miou is None:
        promote, reason = first_model(first, note)
        return Decision(promote, reason, challenger_miou, None, None, first, n,
                        champion_note=note, **common)
    gain = challenger_miou - champion_miou
    delta = delta_check("mIoU", challenger_miou, champion_miou, gain, champion_version,
                        reg.min_delta)
    test = paired_iou_test(np.asarray(challenger_iou), np.asarray(champion_iou),
                           seg.paired_test, seed=params.seed)
    significant = test.p_value <= reg.alpha and test.mean_delta > 0
    paired = Check("paired", seg.paired_required, significant,
                   f"{test.method} one-sided p={test.p_value:.4g} "
                   f"{'<=' if test.p_value <= reg.alpha else '>'} alpha {reg.alpha} "
                   f"(mean per-image IoU gain {test.mean_delta:+.4f} over {test.n} images)")
    checks = [*first, delta, paired]
    promote = all(c.passed for c in checks if c.required)
    if promote:
        reason = (f"mIoU {challenger_miou:.4f} beats champion v{champion_version} "
                  f"{champion_miou:.4f} (gain {gain:+.4f} >= min_delta {reg.min_delta}"
                  + (f", {test.method} p={test.p_value:.4g} <= {reg.alpha}"
                     if seg.paired_required else "") + ")")
    else:
        failed = "; ".join(c.detail for c in checks if c.required and not c.passed)
        reason = f"kept champion v{champion_version}: {failed}"
    return Decision(promote, reason, challenger_miou, champion_version, champion_miou, checks,
                    n, gain, test.p_value, **common)
