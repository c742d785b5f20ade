"""`mlflow models serve -m models:/<name>@champion` answers a real HTTP request on loopback."""

from __future__ import annotations

import base64
import json
import urllib.request
from pathlib import Path

import pytest
from projects import registered_project, split_images
from serving import NAME, serve_champion


def test_mlflow_models_serve_answers_over_http(tmp_path_factory, digits_dir, tmp_path: Path):
    import mlflow
    import pandas as pd

    from visionflow.mlops import registry

    layout = registered_project(tmp_path_factory, digits_dir)
    with serve_champion(layout, tmp_path / "serve.log") as url:
        files = split_images(layout, 3)
        body = {
            "dataframe_split": {
                "columns": ["image"],
                "data": [[base64.b64encode(p.read_bytes()).decode()] for p in files],
            },
            "params": {"topk": 2},
        }
        req = urllib.request.Request(f"{url}/invocations",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.status == 200
            answer = json.loads(r.read())["predictions"]

    registry.client_for(layout.root)
    local = mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict(
        pd.DataFrame({"image": [p.read_bytes() for p in files]}))
    assert [a["label"] for a in answer] == local["label"].tolist()
    assert [a["score"] for a in answer] == pytest.approx(local["score"].tolist(), abs=1e-6)
    assert all(len(json.loads(a["topk"])) == 2 for a in answer)
