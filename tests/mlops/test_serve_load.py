"""The served champion under load and under bad requests (issue #21): `mlflow models serve`
answers requests from 8 clients at once without an error (bench/bench_serve.py, as a user
runs it), and every malformed payload (wrong shape, not an image, empty, huge) gets a 4xx
with a one-line reason, never a 5xx; the server goes on answering."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pandas as pd
import pytest
from builders import bomb_png
from helpers import REPO
from projects import registered_project, split_images, trained_project
from serving import ping, serve_champion

from visionflow.mlops.pyfunc_classifier import BadInput, ImageClassifierModel, Limits
from visionflow.model.classifier import load_classifier

pytestmark = pytest.mark.slow
MAX_BYTES = 50_000_000  # validate.max_bytes (params.yaml), the served model's limit


def _split(values: list) -> dict:
    return {"dataframe_split": {"columns": ["image"], "data": [[v] for v in values]}}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# name -> (body, content type, the reason the model gives; None: MLflow's server refuses it)
def _malformed(image: bytes) -> dict[str, tuple[bytes, str, str | None]]:
    js = "application/json"
    cases: dict[str, tuple[object, str, str | None]] = {
        "not an image": (_split([_b64(b"hello, world" * 10)]), js, "image 0: cannot load image"),
        "second not an image": (_split([_b64(image), _b64(b"GIF89a")]), js, "image 1: "),
        "empty image": (_split([""]), js, "image 0: cannot load image: zero_byte"),
        "no rows": (_split([]), js, "no image in the request"),
        "wrong shape (1-D array)": ({"inputs": {"image": [[1, 2, 3]]}}, js,
                                    "image 0: image array must be HxW, HxWxC or CxHxW"),
        "wrong shape (null)": (_split([None]), js, None),
        "huge pixels (bomb)": (_split([_b64(bomb_png())]), js, "decompression_bomb"),
        "huge bytes": (_split([_b64(b"\x89PNG\r\n\x1a\n" + bytes(MAX_BYTES))]), js,
                       f"more than the {MAX_BYTES} allowed"),
        "topk 0": ({**_split([_b64(image)]), "params": {"topk": 0}}, js,
                   "params.topk must be a whole number >= 1, got 0"),
        "empty body": (b"", js, None),
        "not JSON": (b"{not json", js, None),
        "no input field": ({}, js, None),
        "wrong column": ({"dataframe_split": {"columns": ["x"], "data": [[_b64(image)]]}},
                         js, None),
        "not base64": (_split(["!!!"]), js, None),
        "topk not a number": ({**_split([_b64(image)]), "params": {"topk": "abc"}}, js, None),
        "text/plain": (b"hello", "text/plain", None),
        "CSV, not base64": (b"image\nabc\n", "text/csv",
                            "image 0: text that is not base64-encoded image bytes"),
    }
    return {k: (b if isinstance(b, bytes) else json.dumps(b).encode(), ct, why)
            for k, (b, ct, why) in cases.items()}


def _post(url: str, body: bytes, content_type: str = "application/json") -> tuple[int, bytes]:
    req = urllib.request.Request(f"{url}/invocations", data=body,
                                 headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@pytest.fixture(scope="module")
def served(tmp_path_factory, digits_dir):
    layout = registered_project(tmp_path_factory, digits_dir)
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with serve_champion(layout, log) as url:
        yield layout, url, log


def test_eight_clients_at_once_get_no_error(served, tmp_path):
    """200 requests from 8 threads on keep-alive connections (BENCHMARKS.md: 2,000)."""
    layout, url, _ = served
    images = tmp_path / "images"
    images.mkdir()
    for p in split_images(layout, 16):
        (images / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "load.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench_serve.py"), "--url", url,
                           "--images", str(images), "--requests", "200", "--concurrency", "8",
                           "--warmup", "8", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert (result["ok"], result["errors"]) == (200, 0), result
    assert 0 < result["p50_ms"] <= result["p99_ms"]


def test_malformed_payloads_get_a_4xx_with_one_line_and_the_server_lives(served):
    layout, url, log = served
    image = split_images(layout, 1)[0].read_bytes()
    for name, (body, content_type, why) in _malformed(image).items():
        status, answer = _post(url, body, content_type)
        assert 400 <= status < 500, (name, status, answer[:500])
        if why is not None:  # the model's own reason: one line, no traceback
            error = json.loads(answer)
            assert "\n" not in error["message"] and why in error["message"], (name, error)
            assert error["error_code"] == "INVALID_PARAMETER_VALUE" and "stack_trace" not in error
        assert ping(url), f"server dead after {name!r}:\n{log.read_text()[-3000:]}"
    status, answer = _post(url, json.dumps(_split([_b64(image)])).encode())
    assert status == 200 and len(json.loads(answer)["predictions"]) == 1  # still serving


def test_bad_input_is_one_line_in_process(tmp_path_factory, digits_dir):
    """The same reasons without a server (what `mlflow.pyfunc.load_model(...).predict`
    raises); MLflow's rewrite of a predict error's message leaves them as they are."""
    layout = trained_project(tmp_path_factory, digits_dir)
    model = ImageClassifierModel()
    model.model, model.arch = load_classifier(layout.model)
    model.topk, model.tta, model.device, model.limits = 3, False, "cpu", Limits(1000)
    good = split_images(layout, 1)[0].read_bytes()
    assert len(good) <= 1000
    bad = {"image 0: cannot load image: not_an_image": [b"hello"],
           "image 1: cannot load image: zero_byte": [good, b""],
           "image 0: 1001 bytes, more than the 1000 allowed": [b"x" * 1001],
           "image 0: image array must be HxW": [np.zeros(3)],
           "image 0: text that is not base64-encoded image bytes (Only base64 data is "
           "allowed)": ["!!!"],
           "no image in the request": []}
    for why, images in bad.items():
        with pytest.raises(BadInput) as err:
            model.predict(None, pd.DataFrame({"image": images}))
        assert why in err.value.message and "\n" not in err.value.message
        assert err.value.get_http_status_code() == 400
        err.value.message = f"Failed to predict data '{images}'. \nError: {err.value.message}"
        assert err.value.message.startswith(why.split(":")[0]), err.value.message
    with pytest.raises(BadInput, match="params.topk must be a whole number >= 1, got -1"):
        model.predict(None, pd.DataFrame({"image": [good]}), {"topk": -1})
    assert len(model.predict(None, pd.DataFrame({"image": [good]}), {"topk": 2})) == 1


def test_registered_model_carries_the_data_gate_limits(served):
    import mlflow

    layout, _, _ = served
    from visionflow.mlops import registry

    registry.client_for(layout.root)
    config = mlflow.pyfunc.load_model("models:/visionflow-classifier@champion").model_config
    assert config["max_image_bytes"] == MAX_BYTES and config["max_image_pixels"] == 89_478_485
