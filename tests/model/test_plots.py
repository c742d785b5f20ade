"""Evaluation plots stay one size whatever the number of classes (a side that grew with
the classes made a 300-class confusion 15,200 px square: 131 s and 9.6 GB for evaluate's
three class plots), and show what a person reads them for."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from PIL import Image

from visionflow.model import plots, segmentation_plots


def _rows(n: int) -> list[dict]:
    rng = random.Random(0)
    return [{"class": f"class_{i:03d}", **{m: rng.random() for m in (*plots.PER_CLASS, "dice")}}
            for i in range(n)]


def test_many_classes_give_bounded_figures(tmp_path: Path):
    n = 120
    rng = random.Random(0)
    classes = [f"class_{i:03d}" for i in range(n)]
    matrix = [[rng.randint(0, 3) + (20 if i == j else 0) for j in range(n)] for i in range(n)]
    side = int(plots.MAX_SIDE_IN * 100)
    for normalize in (False, True):
        png = tmp_path / f"confusion_{normalize}.png"
        plots.plot_confusion(png, matrix, classes, normalize=normalize)
        with Image.open(png) as im:
            assert max(im.size) <= side, im.size
    rows = _rows(n)
    shown = {"per_class.png": plots.plot_per_class(tmp_path / "per_class.png", rows),
             "iou.png": segmentation_plots.plot_iou_bars(tmp_path / "iou.png", rows, 0.5)}
    for name, metric in (("per_class.png", "f1"), ("iou.png", "iou")):
        with Image.open(tmp_path / name) as im:
            assert im.size[0] <= 2 * side, (name, im.size)
        lowest = [r["class"] for r in plots.lowest(rows, metric)]
        assert shown[name] == lowest and len(lowest) == plots.MAX_NAMED, name


def test_bars_show_the_classes_with_the_lowest_score():
    rows = _rows(100)
    shown = plots.lowest(rows, "f1")
    assert len(shown) == plots.MAX_NAMED
    assert max(r["f1"] for r in shown) <= min(r["f1"] for r in rows if r not in shown)
    few = rows[:plots.MAX_NAMED]
    assert plots.lowest(few, "f1") == few  # all of them, in their order
    rows[0]["iou"] = None  # a class absent from the test pixels is not a weak class
    assert rows[0] not in plots.lowest(rows, "iou")


def test_rows_are_normalised_and_an_empty_row_stays_zero():
    values = plots.confusion_values([[3, 1, 0], [0, 0, 0], [2, 2, 4]], normalize=True)
    assert values.tolist() == [[0.75, 0.25, 0.0], [0.0, 0.0, 0.0], [0.25, 0.25, 0.5]]
    assert plots.confusion_values([[3, 1], [0, 2]]).tolist() == [[3.0, 1.0], [0.0, 2.0]]
    with pytest.raises(ValueError):
        plots.confusion_values([[1, 2], [3]], normalize=True)  # ragged: not a matrix
