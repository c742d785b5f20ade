"""What a stage prints when it ends: one line of its result's scalar fields (`dvc repro`'s
output is read by people; `test_e2e` reads it, MLflow's per-run INFO lines absent)."""

from __future__ import annotations

from pathlib import Path

from visionflow.stages import result_line
from visionflow.stages.train import TrainResult


def test_a_result_is_one_line_of_its_scalars():
    line = result_line("train", TrainResult(Path("outputs/train/model.pt"), 3, 0.912345678,
                                            12.3456, 1234.5678, "cpu"))
    assert line == ("model_path=outputs/train/model.pt epochs_run=3 val_top1=0.9123 "
                    "seconds=12.35 images_per_s=1235 device=cpu")
    nested = result_line("evaluate", {"top1": 0.1, "iou_per_class": {"0": 0.5}, "n_test": 30,
                                      "classes": ["a", "b"], "note": "x" * 200, "p": None})
    assert nested == "top1=0.1 n_test=30"  # None: not applicable; the rest is in outputs/
    summary = {"success": True, "files": 9, "counts": {"train": {"a": 3}}}
    assert result_line("validate", {"summary": summary, "report": {}}) == "success=True files=9"


def test_compress_line_signs_a_drop_as_a_loss():
    from visionflow.stages.compress import _summary_line

    sel = {"name": "int8", "size_bytes": 1_040_000, "size_ratio": 0.1313, "mac_ratio": 1.0,
           "cpu_b1_ms": 0.42, "speedup_b1_vs_fp32_eager": 3.1, "top1": 0.9777,
           "top1_drop_points": 0.56}
    line = _summary_line({"selected": sel, "objective": "size"})
    assert line.endswith("top-1 0.9777 (-0.56 pt against fp32)"), line
    same = _summary_line({"selected": {**sel, "top1_drop_points": 0.0}, "objective": "size"})
    assert same.endswith("(+0.00 pt against fp32)"), same  # not "-0.00"
