"""Test-split mIoU of the segmentation pipeline's small project over seeds.

The project of `tests/segmentation/test_segmentation_pipeline.py`: 160 generated shapes of
32..40 px, a width-8 U-Net at 32 px, one thread, int8 the one compression (OVERRIDES mirrors
`tests/seg_projects.py`'s SEG). Validate, pack, train and evaluate run as
`python -m visionflow.stages.<name> -s seed=N`, as `dvc repro` runs them; per seed: test
mIoU, per-class IoU and the wall seconds of the four. How far the test's threshold sits from
what training reaches on this CPU.

    .venv/bin/python bench/bench_seg_seeds.py --seeds 6 -s segmentation.epochs=30
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("validate", "pack", "train", "evaluate")
OVERRIDES = ["task=segmentation", "data.val_fraction=0.1", "data.test_fraction=0.2",
             "segmentation.model=unet", 'segmentation.model_kwargs={"width": 8, "depth": 3}',
             "segmentation.image_size=32", "segmentation.epochs=30",
             "segmentation.batch_size=16", "segmentation.lr=0.01",
             "segmentation.worst_images=4", "train.threads=1",
             "register.model_name=visionflow-segmenter", "register.min_test_images=10",
             "compress.methods=[int8]", "compress.max_miou_drop=2.0"]


def project(base: Path, overrides: list[str]) -> Path:
    import yaml

    from visionflow.core.configfile import apply_overrides, read_params_file
    from visionflow.data.segmentation_synth import materialize_shapes

    root = base / "proj"
    root.mkdir(parents=True)
    for name in ("dvc.yaml", "flows", "presets"):
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(REPO / name, root / name)
    materialize_shapes(root / "data", n_images=160, seed=0, min_side=32, max_side=40)
    raw = apply_overrides(read_params_file(REPO / "params.yaml"), [*OVERRIDES, *overrides])
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("-s", "--set", dest="overrides", action="append", default=[],
                    help="KEY=VALUE on top of the test's project")
    ap.add_argument("--out", help="write the rows as JSON here")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="vflow-segseeds-") as tmp:
        root = project(Path(tmp), a.overrides)
        for seed in range(a.seeds):
            t0 = time.perf_counter()
            for stage in STAGES:
                proc = subprocess.run([sys.executable, "-m", f"visionflow.stages.{stage}",
                                       "-s", f"seed={seed}"], cwd=root, capture_output=True,
                                      text=True)
                if proc.returncode:
                    sys.exit(f"seed {seed}, {stage}: {proc.stderr.strip()[-2000:]}")
            m = json.loads((root / "outputs" / "evaluate" / "metrics.json").read_text())
            row = {"seed": seed, "miou": round(m["miou"], 4), "seconds":
                   round(time.perf_counter() - t0, 1),
                   "iou": {k: round(v, 3) for k, v in m["iou"].items()}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    mious = [r["miou"] for r in rows]
    print(f"overrides {a.overrides}: test mIoU min {min(mious):.4f}, median "
          f"{statistics.median(mious):.4f}, max {max(mious):.4f}")
    if a.out:
        Path(a.out).write_text(json.dumps({"overrides": a.overrides, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
