"""Data drift against the champion: summarise a training manifest, compare two summaries.

`summarize(rows)` condenses the usable training rows of a manifest into a small JSON-able
dict (class distribution, per-channel pixel mean/std, image-size distribution). validate
writes it to `outputs/validate/data_summary.json` (and into `validation.json` under
`data_summary`), so the pipeline run that produces a champion carries it as an artifact.

`compare(current, reference, cfg)` reports:
  * class mix: population stability index (PSI) and a chi-square goodness-of-fit test;
  * pixels: the largest change of a per-channel mean or std (0..1 intensity scale);
  * sizes: PSI over power-of-two width x height buckets;
and flags drift where a value exceeds its threshold in `validate` params.

The champion's summary comes from MLflow (`mlops.lineage.champion_summary`).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

SUMMARY_VERSION = 1
_EPS = 1e-4  # floor for empty bins in PSI


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split()] if text else []


def _bucket(n: int) -> int:
    return 1 << max(0, int(n).bit_length() - 1)  # power of two <= n


def _quantiles(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    s = sorted(values)

    def pick(q: float) -> int:
        return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]

    return {"min": s[0], "p05": pick(0.05), "median": pick(0.5), "p95": pick(0.95), "max": s[-1]}


def summarize(rows: list[dict[str, Any]], split: str | None = "train") -> dict[str, Any]:
    """Summary of the usable rows (of one split; `split=None`: all rows)."""
    use = [r for r in rows if not r.get("quarantine_reason")
           and (split is None or r.get("split") == split)]
    classes = Counter(str(r["label"]) for r in use)
    n = len(use)
    sums: list[float] = []
    sq: list[float] = []
    pixels = 0.0
    widths: list[int] = []
    heights: list[int] = []
    sizes: Counter = Counter()
    for r in use:
        w, h = int(r["width"] or 0), int(r["height"] or 0)
        widths.append(w)
        heights.append(h)
        sizes[f"{_bucket(w)}x{_bucket(h)}"] += 1
        mean, std = _floats(r.get("mean", "")), _floats(r.get("std", ""))
        if not mean or len(mean) != len(std):
            continue
        if not sums:
            sums, sq = [0.0] * len(mean), [0.0] * len(mean)
        if len(mean) != len(sums):
            continue
        k = float(max(1, w * h))
        pixels += k
        for c, (m, s) in enumerate(zip(mean, std, strict=True)):
            sums[c] += k * m
            sq[c] += k * (s * s + m * m)
    pix_mean = [v / pixels for v in sums] if pixels else []
    pix_std = [math.sqrt(max(0.0, q / pixels - m * m)) for q, m in zip(sq, pix_mean, strict=True)]
    return {
        "version": SUMMARY_VERSION,
        "split": split or "all",
        "images": n,
        "classes": dict(sorted(classes.items())),
        "class_fractions": {c: round(k / n, 6) for c, k in sorted(classes.items())} if n else {},
        "pixel": {"channels": len(pix_mean), "mean": [round(v, 6) for v in pix_mean],
                  "std": [round(v, 6) for v in pix_std]},
        "size": {"width": _quantiles(widths), "height": _quantiles(heights),
                 "buckets": dict(sorted(sizes.items()))},
    }


def psi(current: dict[str, float], reference: dict[str, float]) -> float:
    """Population stability index of two count (or fraction) maps over their union."""
    keys = sorted(set(current) | set(reference))
    tc, tr = sum(current.values()), sum(reference.values())
    if not keys or tc <= 0 or tr <= 0:
        return 0.0
    total = 0.0
    for k in keys:
        p = max(current.get(k, 0) / tc, _EPS)
        q = max(reference.get(k, 0) / tr, _EPS)
        total += (p - q) * math.log(p / q)
    return total


def chi_square(current: dict[str, int], reference: dict[str, float]) -> tuple[float, int, float]:
    """Goodness of fit of current class counts to the reference mix: (chi2, dof, p-value)."""
    keys = sorted(set(current) | set(reference))
    n, tr = sum(current.values()), sum(reference.values())
    if len(keys) < 2 or n <= 0 or tr <= 0:
        return 0.0, 0, 1.0
    stat = 0.0
    for k in keys:
        expected = max(reference.get(k, 0) / tr, _EPS) * n
        stat += (current.get(k, 0) - expected) ** 2 / expected
    dof = len(keys) - 1
    try:
        from scipy.special import chdtrc

        p = float(chdtrc(dof, stat))
    except ImportError:  # pragma: no cover - scipy ships with scikit-learn
        p = float("nan")
    return stat, dof, p


def _threshold(cfg: Any, name: str, default: float) -> float:
    if isinstance(cfg, dict):
        return float(cfg.get(name, default))
    return float(getattr(cfg, name, default))


def compare(current: dict[str, Any], reference: dict[str, Any], cfg: Any = None) -> dict[str, Any]:
    """Drift of `current` against `reference` (two `summarize` outputs).

    `cfg` is the `validate` config (or a dict) with drift_class_psi, drift_pixel_shift and
    drift_size_psi. Returns {"status": "ok"|"drift", "drifted": [...], "checks": {...}}."""
    t_class = _threshold(cfg, "drift_class_psi", 0.2)
    t_pixel = _threshold(cfg, "drift_pixel_shift", 0.05)
    t_size = _threshold(cfg, "drift_size_psi", 0.2)
    checks: dict[str, Any] = {}

    cur_c, ref_c = current.get("classes", {}), reference.get("classes", {})
    value = psi(cur_c, ref_c)
    stat, dof, p = chi_square(cur_c, ref_c)
    tc, tr = sum(cur_c.values()) or 1, sum(ref_c.values()) or 1
    changes = sorted(((abs(cur_c.get(k, 0) / tc - ref_c.get(k, 0) / tr), k)
                      for k in set(cur_c) | set(ref_c)), reverse=True)[:3]
    checks["class_mix"] = {
        "psi": round(value, 6), "threshold": t_class, "drift": value > t_class,
        "chi2": round(stat, 4), "dof": dof, "p_value": p,
        "added": sorted(set(cur_c) - set(ref_c)), "removed": sorted(set(ref_c) - set(cur_c)),
        "largest_changes": [{"label": k, "reference": round(ref_c.get(k, 0) / tr, 4),
                             "current": round(cur_c.get(k, 0) / tc, 4)} for _, k in changes],
    }

    cp, rp = current.get("pixel", {}), reference.get("pixel", {})
    if cp.get("channels") and cp.get("channels") == rp.get("channels"):
        dm = [round(a - b, 6) for a, b in zip(cp["mean"], rp["mean"], strict=True)]
        ds = [round(a - b, 6) for a, b in zip(cp["std"], rp["std"], strict=True)]
        shift = max(abs(v) for v in dm + ds)
        checks["pixel"] = {"mean_shift": dm, "std_shift": ds, "max_shift": round(shift, 6),
                           "threshold": t_pixel, "drift": shift > t_pixel}
    else:
        checks["pixel"] = {"drift": bool(cp.get("channels") and rp.get("channels")),
                           "threshold": t_pixel,
                           "note": f"channels differ: {cp.get('channels')} vs "
                                   f"{rp.get('channels')}"}

    cs = current.get("size", {}).get("buckets", {})
    value = psi(cs, reference.get("size", {}).get("buckets", {}))
    checks["size"] = {"psi": round(value, 6), "threshold": t_size, "drift": value > t_size,
                      "current_median": [current.get("size", {}).get(d, {}).get("median")
                                         for d in ("width", "height")],
                      "reference_median": [reference.get("size", {}).get(d, {}).get("median")
                                           for d in ("width", "height")]}
    drifted = [k for k, c in checks.items() if c["drift"]]
    return {"status": "drift" if drifted else "ok", "drifted": drifted, "checks": checks,
            "current_images": current.get("images"), "reference_images": reference.get("images")}


def describe(report: dict[str, Any]) -> str:
    """One line naming what drifted, with values and thresholds."""
    parts = []
    for name in report.get("drifted", []):
        c = report["checks"][name]
        if name == "class_mix":
            parts.append(f"class-mix PSI {c['psi']:.3f} > validate.drift_class_psi="
                         f"{c['threshold']}")
        elif name == "pixel" and "max_shift" in c:
            parts.append(f"pixel mean/std shift {c['max_shift']:.3f} > "
                         f"validate.drift_pixel_shift={c['threshold']}")
        elif name == "pixel":
            parts.append(c["note"])
        else:
            parts.append(f"image-size PSI {c['psi']:.3f} > validate.drift_size_psi="
                         f"{c['threshold']}")
    return "; ".join(parts)
