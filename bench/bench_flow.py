"""Orchestration overhead of the `retrain` Prefect flow.

Each sample is one fresh process on a scratch copy of the project (repo's params.yaml plus
`--set` overrides), so imports and Prefect's API start-up are paid the way a user pays them:

- direct:    the six stage functions called in order
  (`visionflow.orchestration.stage_runner.run_stage`);
- ephemeral: `retrain(force=True)` with no server: Prefect starts its temporary API in-process;
- server:    the same against a running `vflow server` (PREFECT_API_URL).

For each flow sample the script records the flow's wall time, the time spent inside the
stage functions (measured in the tasks), and the API start-up. Overhead is reported two
ways: flow wall minus the in-run stage sum (same run, so training noise cancels), and
flow wall against the median direct stage sum (what the issue asks). Medians over repeats.

    .venv/bin/python bench/bench_flow.py --repeats 3 -s compress.methods=[prune]
    .venv/bin/python bench/bench_flow.py --repeats 3 --data-source \\
        /work/shared/datasets/cifar10-jpeg.tar.gz -s data.image_size=32 -s train.model=fast \\
        -s train.epochs=50 -s train.time_budget_s=60 -s compress.methods=[prune]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("validate", "pack", "train", "evaluate", "compress", "register")


def _project(base: Path, overrides: list[str], data_source: str | None) -> Path:
    import yaml

    from visionflow.core.configfile import apply_overrides, read_params_file

    root = base / "proj"
    root.mkdir(parents=True)
    for name in ("dvc.yaml", "flows", "presets"):
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, root / name)
    sets = list(overrides)
    if data_source:
        sets.append(f"data.source={json.dumps(str(Path(data_source).resolve()))}")
    else:
        from visionflow.data.digits import materialize_digits

        materialize_digits(root / "data")
    raw = apply_overrides(read_params_file(REPO / "params.yaml"), sets)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (root / "mlruns").mkdir()
    return root


def worker(mode: str, root: Path) -> dict:
    """One sample, in this (fresh) process; prints one JSON line."""
    t_proc = time.perf_counter()
    from visionflow.core.configfile import load_params
    from visionflow.core.layout import Layout

    layout = Layout.at(root)
    if mode == "direct":
        from visionflow.orchestration.stage_runner import run_stage

        params = load_params(layout.params, root=layout.root)
        seconds = {}
        t0 = time.perf_counter()
        for name in STAGES:
            t = time.perf_counter()
            run_stage(name, params, layout)
            seconds[name] = time.perf_counter() - t
        return {"mode": mode, "stage_seconds": seconds, "stage_sum": sum(seconds.values()),
                "run_wall": time.perf_counter() - t0,
                "process_wall": time.perf_counter() - t_proc}

    from prefect.client.orchestration import get_client
    from prefect.utilities.importtools import load_script_as_module

    from visionflow.orchestration.servers import prefect_api

    flow_mod = load_script_as_module(str(root / "flows" / "retrain.py"))
    with prefect_api(layout) as url:
        assert (url is None) == (mode == "ephemeral"), (mode, url)
        t = time.perf_counter()
        with get_client(sync_client=True) as client:  # ephemeral: starts the temporary API
            client.api_healthcheck()
        api_startup = time.perf_counter() - t
        t0 = time.perf_counter()
        out = flow_mod.retrain(root=str(root), force=True)
        flow_wall = time.perf_counter() - t0
    seconds = out["stage_seconds"]
    return {"mode": mode, "stage_seconds": seconds, "stage_sum": sum(seconds.values()),
            "api_startup": api_startup, "run_wall": flow_wall,
            "flow_overhead": flow_wall - sum(seconds.values()),
            "process_wall": time.perf_counter() - t_proc, "version": out["version"]}


def _sample(mode: str, root: Path, env: dict) -> dict:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--worker", mode, "--root", str(root)],
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{mode} sample failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{\"mode\"")][-1]
    return {**json.loads(line), "subprocess_wall": wall}


def _median(samples: list[dict], key: str) -> float | None:
    vals = [s[key] for s in samples if s.get(key) is not None]
    return statistics.median(vals) if vals else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", default="direct,ephemeral,server")
    ap.add_argument("-s", "--set", dest="overrides", action="append", default=[])
    ap.add_argument("--data-source", default=None, help="data.source (default: digits)")
    ap.add_argument("--out", default=None, help="write the samples and medians as JSON")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--root", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, Path(a.root))))
        return

    from visionflow.core.layout import Layout
    from visionflow.orchestration import servers as server

    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    base = Path(tempfile.mkdtemp(prefix="bench-flow-"))
    env = {**os.environ, "PREFECT_HOME": str(base / "prefect"),
           "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(base / "prefect" / "results"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true",
           "PREFECT_LOGGING_LEVEL": "WARNING", "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("PREFECT_API_URL", None)
    root = _project(base, a.overrides, a.data_source)
    srv_layout = Layout.at(base)
    samples: dict[str, list[dict]] = {m: [] for m in modes}
    try:
        print(f"project {root}; warm-up (direct, not counted) ...", flush=True)
        _sample("direct", root, env)  # first-time costs: extraction, validate memo, MLflow db
        server_env = dict(env)
        if "server" in modes:
            os.environ.update({k: v for k, v in env.items()})
            st = server.start(server.PREFECT, srv_layout, port=0, ui=False, timeout=300)
            server_env["PREFECT_API_URL"] = st.api_url
            print(f"server {st.api_url}", flush=True)
        for i in range(a.repeats):  # interleaved, so load drifts hit every mode alike
            for mode in modes:
                s = _sample(mode, root, server_env if mode == "server" else env)
                samples[mode].append(s)
                print(f"[{i + 1}/{a.repeats}] {mode:9s} run {s['run_wall']:7.2f} s  stages "
                      f"{s['stage_sum']:7.2f} s  api {s.get('api_startup') or 0:5.2f} s  "
                      f"process {s['subprocess_wall']:7.2f} s", flush=True)
    finally:
        server.stop(server.PREFECT, srv_layout)

    med = {m: {k: _median(v, k) for k in ("stage_sum", "run_wall", "api_startup",
                                           "flow_overhead", "subprocess_wall")}
           for m, v in samples.items()}
    for m in med:
        med[m]["train"] = statistics.median(s["stage_seconds"]["train"] for s in samples[m])
    direct = med.get("direct", {}).get("stage_sum")
    print("\nmedians (seconds)            " + "  ".join(f"{m:>10s}" for m in modes))
    rows = [("stage functions (sum)", "stage_sum"), ("  of which train", "train"),
            ("flow / direct run wall", "run_wall"), ("API start-up", "api_startup"),
            ("flow wall - in-run stages", "flow_overhead"), ("process wall", "subprocess_wall")]
    for label, key in rows:
        print(f"{label:28s} " + "  ".join(
            f"{med[m][key]:10.2f}" if med[m].get(key) is not None else f"{'-':>10s}"
            for m in modes))
    if direct:
        for m in modes:
            if m == "direct":
                continue
            over = med[m]["flow_overhead"]
            vs_direct = med[m]["run_wall"] - direct
            print(f"{m}: in-run overhead {over:.2f} s ({over / med[m]['stage_sum']:.1%} of its "
                  f"stages); flow wall vs direct stage sum {vs_direct:+.2f} s "
                  f"({vs_direct / direct:+.1%}); + API start-up {med[m]['api_startup']:.2f} s")
    if a.out:
        Path(a.out).write_text(json.dumps({"args": vars(a), "samples": samples,
                                           "medians": med}, indent=1))
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
