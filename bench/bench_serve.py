"""Serving under load: `mlflow models serve` of the champion, N requests at concurrency C.

Each request is one test-split image (base64 in a `dataframe_split` JSON body, as a client
sends it), on a keep-alive connection per client thread. Reports requests/s, the latency
median, p90, p99 and max, and every non-200 answer or connection error (exit 1 if any).

    # a scratch project (digits, alexnet, 1 epoch) is trained, registered and served:
    .venv/bin/python bench/bench_serve.py --requests 2000 --concurrency 8
    # or an already running server (what the tests do):
    .venv/bin/python bench/bench_serve.py --url http://127.0.0.1:5000 --images DIR ...
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODEL = "visionflow-classifier"
SCRATCH_SETS = ["data.limit_per_class=20", "train.model=alexnet", "train.epochs=1",
                "data.image_size=16", "train.threads=2", "train.progress=false"]


def body_for(image: bytes) -> bytes:
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": [
        [base64.b64encode(image).decode()]]}}).encode()


def load(url: str, bodies: list[bytes], requests: int, concurrency: int,
         timeout: float = 60) -> dict:
    """`requests` POSTs to url/invocations from `concurrency` threads; latencies in ms."""
    parts = urlsplit(url)
    local = threading.local()
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []

    def one(i: int) -> None:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = http.client.HTTPConnection(parts.hostname, parts.port,
                                                           timeout=timeout)
        t0 = time.perf_counter()
        try:
            conn.request("POST", "/invocations", bodies[i % len(bodies)],
                         {"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
            ok = resp.status == 200 and b'"predictions"' in data
            why = "" if ok else f"HTTP {resp.status}: {data[:200]!r}"
        except (OSError, http.client.HTTPException) as err:
            why = f"{type(err).__name__}: {err}"
            local.conn = None
            conn.close()
        dt = (time.perf_counter() - t0) * 1000
        with lock:
            (errors.append(why) if why else latencies.append(dt))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(requests)))
    wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return {"requests": requests, "concurrency": concurrency, "ok": len(latencies),
            "errors": len(errors), "error_examples": errors[:5], "seconds": round(wall, 3),
            "requests_per_s": round(requests / wall, 1),
            "p50_ms": round(statistics.median(latencies), 2) if latencies else None,
            "p90_ms": round(q[89], 2), "p99_ms": round(q[98], 2),
            "max_ms": round(max(latencies), 2) if latencies else None}


def _scratch_project(base: Path) -> Path:
    """Digits, trained and registered (v1 @champion) with the six stage functions."""
    import yaml

    from visionflow.core.configfile import apply_overrides, load_params, read_params_file
    from visionflow.core.layout import Layout
    from visionflow.data.digits import materialize_digits
    from visionflow.orchestration.stage_runner import run_stage

    root = base / "proj"
    root.mkdir(parents=True)
    shutil.copytree(REPO / "presets", root / "presets")
    materialize_digits(root / "data")
    raw = apply_overrides(read_params_file(REPO / "params.yaml"), SCRATCH_SETS)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (root / "mlruns").mkdir()
    layout = Layout.at(root)
    params = load_params(layout.params)
    for stage in ("validate", "augment", "train", "evaluate", "register"):
        run_stage(stage, params, layout)
    return root


@contextlib.contextmanager
def served(root: Path, workers: int, log: Path) -> Iterator[str]:
    from visionflow.core.layout import Layout
    from visionflow.mlops import tracking
    from visionflow.orchestration.servers import free_port

    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.tracking_uri(Layout.at(root)),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    url = f"http://127.0.0.1:{port}"
    with log.open("w") as out:
        proc = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m",
                                 f"models:/{MODEL}@champion", "--env-manager", "local",
                                 "-h", "127.0.0.1", "-p", str(port), "-w", str(workers)],
                                env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while True:
                with contextlib.suppress(OSError), \
                        urllib.request.urlopen(f"{url}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"server not up (rc={proc.poll()}), see {log}")
                time.sleep(0.5)
            yield url
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def _images(root: Path | None, images: str | None, n: int = 64) -> list[bytes]:
    if images:
        files = sorted(p for p in Path(images).rglob("*") if p.is_file())[:n]
    else:
        files = sorted((root / "data" / "test").rglob("*.png"))[:n]
    if not files:
        raise SystemExit("no images to send")
    return [p.read_bytes() for p in files]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--workers", type=int, default=1, help="uvicorn workers of the server")
    ap.add_argument("--url", help="an already running server (else a scratch project's)")
    ap.add_argument("--images", help="folder of images to send (default: the digits' test)")
    ap.add_argument("--warmup", type=int, default=16, help="requests sent before timing")
    ap.add_argument("--json", help="write the result here too")
    a = ap.parse_args()
    with contextlib.ExitStack() as stack:
        root = None
        url = a.url
        if url is None:
            base = Path(tempfile.mkdtemp(prefix="vflow-bench-serve-"))
            stack.callback(shutil.rmtree, base, True)
            root = _scratch_project(base)
            url = stack.enter_context(served(root, a.workers, base / "serve.log"))
        bodies = [body_for(b) for b in _images(root, a.images)]
        if a.warmup:
            load(url, bodies, a.warmup, a.concurrency)
        result = {"url_given": a.url is not None, "workers": a.workers,
                  **load(url, bodies, a.requests, a.concurrency)}
    print(json.dumps(result, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
    sys.exit(1 if result["errors"] else 0)


if __name__ == "__main__":
    main()
