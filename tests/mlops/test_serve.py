"""`mlflow models serve -m models:/<name>@champion` answers a real HTTP request on loopback."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from helpers import BIN
from projects import registered_project, split_images
from serving import log_tail

NAME = "visionflow-classifier"
START_TIMEOUT_S = 180


def _free_port() -> int:
    from visionflow.orchestration.servers import free_port

    return free_port()  # below the ephemeral range: no outgoing connection takes it meanwhile


def _get(url: str, timeout: float = 2.0) -> int:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status


def test_mlflow_models_serve_answers_over_http(tmp_path_factory, digits_dir, tmp_path: Path):
    import mlflow
    import pandas as pd

    from visionflow.mlops import registry, tracking

    layout = registered_project(tmp_path_factory, digits_dir)
    uri = tracking.tracking_uri(layout)
    port = _free_port()
    log = (tmp_path / "serve.log").open("w+")
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{BIN}{os.pathsep}"
           f"{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{NAME}@champion",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read()[-3000:]}")
            try:
                if _get(f"http://127.0.0.1:{port}/ping") == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"server not up after {START_TIMEOUT_S} s:\n{log_tail(log.read())}")
            time.sleep(0.5)

        files = split_images(layout, 3)
        body = {
            "dataframe_split": {
                "columns": ["image"],
                "data": [[base64.b64encode(p.read_bytes()).decode()] for p in files],
            },
            "params": {"topk": 2},
        }
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.status == 200
            answer = json.loads(r.read())["predictions"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()

    registry.client_for(layout.root)
    local = mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict(
        pd.DataFrame({"image": [p.read_bytes() for p in files]}))
    assert [a["label"] for a in answer] == local["label"].tolist()
    assert [a["score"] for a in answer] == pytest.approx(local["score"].tolist(), abs=1e-6)
    assert all(len(json.loads(a["topk"])) == 2 for a in answer)
