"""Serving segmentation models (#19): the trained U-Net logged "from code" and registered
(task tag), its int8 ONNX copy too; `mlflow.pyfunc.load_model` and a real `mlflow models
serve` return masks at each input's size; `vflow predict` writes one index PNG per image;
a model of the other task is a one-line error naming the version and its task."""

from __future__ import annotations

import base64
import csv
import io
import json
import time
import urllib.request

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from segmentation_builders import segmentation_project
from serving import serve_uri

from visionflow.compression.onnx_export import export_onnx
from visionflow.compression.quantize import quantize_int8_onnx
from visionflow.core.configfile import load_params
from visionflow.core.errors import ConfigError
from visionflow.data.segmentation_masks import voc_palette
from visionflow.mlops import registry, tracking
from visionflow.mlops.predict import run_predict
from visionflow.mlops.publish import PACKAGE
from visionflow.mlops.publish_segmentation import (
    check_task,
    log_compact_segmenter,
    log_segmenter_pyfunc,
    tag_task,
    version_task,
)
from visionflow.mlops.pyfunc_classifier import WEIGHTS, BadInput
from visionflow.model.classifier import Arch, build_classifier, save_classifier
from visionflow.model.segmentation import TASK, load_segmenter

SEG, CLF = "shapes-segmenter", "digits-classifier"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A project whose store holds SEG v1 (torch, @champion), SEG v2 (int8 ONNX) and CLF v1
    (an untrained classifier: only its task matters here)."""
    base = tmp_path_factory.mktemp("segmodel")
    layout = segmentation_project(base, tmp_path_factory.mktemp("segserve") / "proj")
    params = load_params(layout.params)
    model, arch = load_segmenter(layout.model)
    work = tmp_path_factory.mktemp("segserve-files")
    example = torch.rand(1, 3, 32, 32)
    fp32 = export_onnx(model, example, work / "fp32.onnx", dynamic_hw=True)
    calib = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB").resize(
        (32, 32)))).permute(2, 0, 1) for p in sorted((layout.root / "data/images").glob(
            "*.png"))[:32]])
    int8 = quantize_int8_onnx(fp32, calib, work / "int8.onnx", keep_first_conv=True)
    clf_file = work / "classifier.pt"
    clf_arch = Arch("fast", 10, 16, classes=[str(i) for i in range(10)])
    save_classifier(clf_file, build_classifier(clf_arch), clf_arch)

    tracking.setup(layout)
    client = registry.client_for(layout)
    with mlflow.start_run():
        v1 = log_segmenter_pyfunc(layout.model, SEG, params).registered_model_version
        v2 = log_compact_segmenter(int8, arch, SEG, params).registered_model_version
        clf = mlflow.pyfunc.log_model(
            name="classifier", python_model=str(PACKAGE / "mlops/pyfunc_classifier_entry.py"),
            artifacts={WEIGHTS: str(clf_file)}, code_paths=[str(PACKAGE)],
            pip_requirements=["torch"], registered_model_name=CLF).registered_model_version
    for version in (v1, v2):
        tag_task(client, SEG, version, TASK)
    client.set_registered_model_alias(SEG, "champion", str(v1))
    assert (v1, v2, clf) == (1, 2, 1)
    images = sorted((layout.root / "data/images").glob("*.png"))[:3]
    return layout, model, images


def _decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def _want(model, image: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None].float() / 255
    with torch.inference_mode():
        return model(x).argmax(1)[0].numpy().astype(np.uint8)


def test_pyfunc_returns_masks_at_any_size(served):
    layout, model, images = served
    pyfunc = mlflow.pyfunc.load_model(f"models:/{SEG}/1")
    odd = np.random.default_rng(0).random((23, 50, 3))  # an array, float 0..1, wide
    frame = pd.DataFrame({"image": [p.read_bytes() for p in images] + [odd]})
    out = pyfunc.predict(frame)
    assert list(out.columns) == ["mask", "height", "width", "classes"] and len(out) == 4
    sources = [np.asarray(Image.open(p).convert("RGB")) for p in images]
    sources.append(np.rint(odd * 255).astype(np.uint8))
    for row, src in zip(out.itertuples(), sources, strict=True):
        mask = _decode(row.mask)
        assert mask.mode == "P" and mask.size == (src.shape[1], src.shape[0])
        assert (row.height, row.width) == src.shape[:2]
        assert mask.getpalette()[:15] == voc_palette()[:15]
        np.testing.assert_array_equal(np.asarray(mask), _want(model, src))
    assert "background" in json.loads(out["classes"][0])
    with pytest.raises(BadInput, match="^image 1: "):
        pyfunc.predict(pd.DataFrame({"image": [images[0].read_bytes(), b"not an image"]}))


def test_compact_int8_model_serves_masks(served):
    layout, model, images = served
    pyfunc = mlflow.pyfunc.load_model(f"models:/{SEG}/2")
    out = pyfunc.predict(pd.DataFrame({"image": [p.read_bytes() for p in images]}))
    for row, p in zip(out.itertuples(), images, strict=True):
        src = np.asarray(Image.open(p).convert("RGB"))
        mask = np.asarray(_decode(row.mask))
        assert mask.shape == src.shape[:2]
        assert (mask == _want(model, src)).mean() > 0.97  # int8 vs fp32, pixel by pixel


def test_mlflow_models_serve_returns_masks(served, tmp_path):
    layout, model, images = served
    t0 = time.monotonic()
    with serve_uri(layout, f"models:/{SEG}@champion", tmp_path / "serve.log") as url:
        body = {"dataframe_split": {"columns": ["image"], "data": [
            [base64.b64encode(p.read_bytes()).decode()] for p in images]}}
        req = urllib.request.Request(f"{url}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            answer = json.loads(r.read())["predictions"]
    print(f"serve test: {time.monotonic() - t0:.1f} s")
    assert len(answer) == len(images)
    for row, p in zip(answer, images, strict=True):
        src = np.asarray(Image.open(p).convert("RGB"))
        mask = np.asarray(_decode(row["mask"]))
        assert mask.shape == src.shape[:2] == (row["height"], row["width"])
        np.testing.assert_array_equal(mask, _want(model, src))


def test_predict_writes_png_masks(served, tmp_path):
    layout, model, images = served
    inputs = tmp_path / "in"
    inputs.mkdir()
    for p in images:
        (inputs / p.name).write_bytes(p.read_bytes())
    (inputs / "broken.png").write_bytes(b"not a png")
    summary = run_predict(f"models:/{SEG}@champion", [inputs], tmp_path / "pred.csv",
                          root=layout.root, progress=False, device="cpu")
    folder = tmp_path / "pred"
    assert (summary.out, summary.images, summary.failed) == (str(folder), 3, 1)
    with (folder / "index.csv").open() as f:
        rows = {r["path"]: r for r in csv.DictReader(f)}
    assert "not" in rows[str(inputs / "broken.png")]["error"]
    for p in images:
        src = np.asarray(Image.open(p).convert("RGB"))
        mask = Image.open(folder / rows[str(inputs / p.name)]["mask"])
        assert mask.mode == "P" and mask.size == (src.shape[1], src.shape[0])
        np.testing.assert_array_equal(np.asarray(mask), _want(model, src))


def test_a_model_of_the_other_task_is_a_one_line_error(served, tmp_path):
    layout, _, images = served
    with pytest.raises(ConfigError) as err:
        run_predict(f"models:/{SEG}@champion", [images[0]], tmp_path / "p.csv",
                    root=layout.root, progress=False, device="cpu", task="classification")
    msg = str(err.value)
    assert "\n" not in msg
    assert f"version 1 of '{SEG}'" in msg and "is a segmentation model" in msg, msg
    with pytest.raises(ConfigError, match=f"version 1 of '{CLF}'.* is a classification model,"
                                          " not a segmentation model"):
        run_predict(f"models:/{CLF}/1", [images[0]], tmp_path / "q.csv", root=layout.root,
                    progress=False, device="cpu", task="segmentation")
    client = registry.client_for(layout)
    seg, clf = client.get_model_version(SEG, "1"), client.get_model_version(CLF, "1")
    assert (version_task(seg), version_task(clf)) == ("segmentation", "classification")
    check_task("register", seg, "segmentation")
    with pytest.raises(ConfigError, match=f"^register: version 1 of '{CLF}' is a "
                                          "classification model, not a segmentation model$"):
        check_task("register", clf, "segmentation")
    with pytest.raises(ConfigError, match="a segmentation model, not a classification"):
        from visionflow.model.classifier import load_classifier

        load_classifier(layout.model)


def test_vflow_predict_cli_masks_and_task(served, tmp_path):
    from typer.testing import CliRunner

    from visionflow.cli.main import app
    from visionflow.core.errors import VisionflowError

    layout, _, images = served
    runner = CliRunner()
    res = runner.invoke(app, ["predict", "--root", str(layout.root), "--model",
                              f"models:/{SEG}@champion", "-o", str(tmp_path / "masks"),
                              "--task", "segmentation", "--no-progress", str(images[0])])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "masks" / f"{images[0].stem}.png").is_file()
    res = runner.invoke(app, ["predict", "--root", str(layout.root), "--model",
                              f"models:/{SEG}@champion", "--task", "classification",
                              str(images[0])])
    assert isinstance(res.exception, VisionflowError)
    assert str(res.exception) == (
        f"--task classification: version 1 of '{SEG}' (models:/{SEG}@champion) is a "
        "segmentation model, not a classification model")
