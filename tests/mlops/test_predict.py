"""`vflow predict`: files, folders and an archive in; CSV/JSON of top-k labels out, equal to
the pyfunc's predictions; unreadable files get an error row; bad input is one line."""

from __future__ import annotations

import csv
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from projects import registered_project, split_images
from typer.testing import CliRunner

NAME = "visionflow-classifier"


@pytest.fixture(scope="module")
def registered(tmp_path_factory, digits_dir):
    return registered_project(tmp_path_factory, digits_dir)


@pytest.fixture(scope="module")
def inputs(registered, tmp_path_factory) -> dict:
    files = split_images(registered, 6)
    base = tmp_path_factory.mktemp("predict-in")
    folder = base / "folder"
    (folder / "sub").mkdir(parents=True)
    for f in files[:2]:
        shutil.copy(f, folder / f.name)
    shutil.copy(files[2], folder / "sub" / files[2].name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (folder / ".hidden.png").write_bytes(b"ignored")
    (folder / "notes.txt").write_text("not an image, not picked up")
    archive = base / "batch.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for f in files[3:5]:
            tar.add(f, arcname=f"batch/{f.name}")
    return {"files": files, "folder": folder, "archive": archive, "single": files[5]}


def _expected(registered, paths: list[Path]):
    import mlflow
    import pandas as pd

    from visionflow.mlops import registry

    registry.client_for(registered.root)
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    return model.predict(pd.DataFrame({"image": [p.read_bytes() for p in paths]}))


def test_predict_folder_archive_and_file_to_csv(registered, inputs, tmp_path):
    from visionflow.cli.main import app

    out = tmp_path / "preds.csv"
    res = CliRunner().invoke(app, [
        "predict", "--root", str(registered.root), "--batch-size", "2", "-o", str(out),
        str(inputs["folder"]), str(inputs["archive"]), str(inputs["single"])])
    assert res.exit_code == 0, res.output
    assert "6 image(s) predicted" in res.output and "1 could not be read" in res.output
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "label", "score", "label_1", "prob_1", "label_2", "prob_2",
                             "label_3", "prob_3", "error"]
    names = [r["path"] for r in rows]
    assert len(rows) == 7 and not any("hidden" in n or "notes" in n for n in names)
    broken = next(r for r in rows if r["path"].endswith("broken.png"))
    assert broken["label"] == "" and "broken.png" in broken["error"]
    assert any(n.startswith(f"{inputs['archive']}:") for n in names)

    files = inputs["files"]
    by_name = {Path(r["path"].split(":")[-1]).name: r for r in rows if not r["error"]}
    expected = _expected(registered, files)
    for f, label, score in zip(files, expected["label"], expected["score"], strict=True):
        row = by_name[f.name]
        assert row["label"] == row["label_1"] == label
        assert float(row["score"]) == pytest.approx(score, abs=2e-6)
        assert float(row["prob_1"]) >= float(row["prob_2"]) >= float(row["prob_3"])


def test_predict_json_with_topk(registered, inputs, tmp_path):
    from visionflow.cli.main import app

    out = tmp_path / "preds.json"
    res = CliRunner().invoke(app, [
        "predict", "--root", str(registered.root), "--model", f"models:/{NAME}/1",
        "--topk", "2", "--device", "cpu", "-o", str(out), str(inputs["single"])])
    assert res.exit_code == 0, res.output
    rows = json.loads(out.read_text())
    assert len(rows) == 1 and rows[0]["error"] == ""
    assert [t["label"] for t in rows[0]["topk"]][0] == rows[0]["label"]
    assert len(rows[0]["topk"]) == 2


def test_predict_user_errors(registered, inputs, tmp_path):
    from visionflow.cli.main import app
    from visionflow.core.errors import DataError, VisionflowError

    runner = CliRunner()
    res = runner.invoke(app, ["predict", "--root", str(registered.root), str(tmp_path / "nope")])
    assert isinstance(res.exception, VisionflowError)
    assert str(res.exception) == f"{tmp_path / 'nope'}: no such file or folder"
    empty = tmp_path / "empty"
    empty.mkdir()
    res = runner.invoke(app, ["predict", "--root", str(registered.root), str(empty)])
    assert "no images found" in str(res.exception)
    res = runner.invoke(app, ["predict", "--root", str(registered.root), "--model",
                              f"models:/{NAME}@nosuchalias", str(split_images(registered, 1)[0])])
    assert isinstance(res.exception, VisionflowError)
    assert "cannot load" in str(res.exception) and "\n" not in str(res.exception)
    # a name the registry does not hold: the line says which it does
    for args in (["predict", "--model", "models:/other@champion", str(inputs["single"])],
                 ["models", "list", "--name", "other"]):
        res = runner.invoke(app, [*args, "--root", str(registered.root)])
        assert f"; it holds: {NAME} (" in str(res.exception), (args, res.output)
    # a mistyped --root: one line, and no empty store made there
    elsewhere = tmp_path / "not-a-project"
    for args in (["predict", "--root", str(elsewhere), str(inputs["single"])],
                 ["models", "list", "--root", str(elsewhere)]):
        res = runner.invoke(app, args)
        assert isinstance(res.exception, DataError) and "no model registry here" in str(
            res.exception), (args, res.output)
    assert not elsewhere.exists()
    # nothing readable: the error rows are written and the exit is a data error
    out = tmp_path / "preds.csv"
    res = runner.invoke(app, ["predict", "--root", str(registered.root), "-o", str(out),
                              str(inputs["folder"] / "broken.png")])
    assert isinstance(res.exception, DataError), res.output
    assert str(res.exception).startswith("0 image(s) predicted") and "broken.png" in str(
        res.exception)
    with out.open() as f:
        assert [r["path"] for r in csv.DictReader(f)] == [str(inputs["folder"] / "broken.png")]
