"""Hyperparameter search on the digits: what each trial's orchestration costs, and what
tuning gains over params.yaml's values.

overhead (one process, one prepared project, the repo's params.yaml):
  bare   `run_trial` called directly: the objective's train plus per-epoch val scoring,
         the training call a hand-written loop would make;
  flow   the same trials through the `tune` flow: a Prefect task each, Optuna ask/tell in
         the sqlite study, the heartbeat, an MLflow child run with per-epoch metrics, the
         pruner asked every epoch (pruner none: every trial trains all epochs), parallel 1,
         a one-value space (`train.lr: {choices: [lr]}`) so that every trial trains alike.
  bare in a thread: the bare call on a fresh worker thread, as the task runner runs it.
  Bare calls (alternating main / thread) run half before and half after the flow (drift
  cancels). Reported: per-trial medians and differences, the bookkeeping alone (Optuna and
  MLflow calls of one trial without training), and the flow's fixed cost (its wall time minus
  its trials': the Prefect API start, the study and the MLflow parent run).

gain: `vflow tune` with params.yaml's `tune:` section (a fresh study), then the train and
  evaluate stages for params.yaml's values and for the best trial's, on seeds 0..S-1:
  test top-1 of each (the test split is read only here, never by the search).

    .venv/bin/python bench/bench_tune.py overhead --trials 9 [--server]
    .venv/bin/python bench/bench_tune.py gain --seeds 3 -s tune.trials=20
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _env() -> dict[str, str]:
    env = dict(os.environ, DO_NOT_TRACK="true", MLFLOW_DISABLE_TELEMETRY="true",
               DVC_NO_ANALYTICS="1", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               GX_ANALYTICS_ENABLED="false")
    return env


def _project(base: Path) -> Path:
    """bench_flow's scratch project (params.yaml, dvc.yaml, flows/, presets/, the digits),
    validated and augmented: what the search reads."""
    from bench_flow import _project as scratch_project

    from visionflow.core.configfile import load_params
    from visionflow.core.layout import Layout
    from visionflow.orchestration.stage_runner import run_stage

    root = scratch_project(base, [], None)
    layout = Layout.at(root)
    params = load_params(layout.params, root=root)
    for stage in ("validate", "pack"):
        run_stage(stage, params, layout)
    return root


@contextlib.contextmanager
def _server(base: Path):
    """A running Prefect server (`vflow server start`'s process) for the flow to talk to,
    instead of the temporary API Prefect starts in this process."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from visionflow.core.layout import Layout
    from visionflow.orchestration import servers

    layout = Layout.at(base / "server")
    layout.root.mkdir(parents=True, exist_ok=True)
    status = servers.start(servers.PREFECT, layout, port=0, ui=False,
                           env={"PREFECT_HOME": str(layout.root / "home")})
    try:
        with temporary_settings({PREFECT_API_URL: status.api_url}):
            yield
    finally:
        servers.stop(servers.PREFECT, layout)


def overhead(args: argparse.Namespace) -> dict:
    import runpy

    import torch

    from visionflow.core.configfile import load_params
    from visionflow.core.layout import Layout
    from visionflow.model.inference import pick_device
    from visionflow.tune.objective import load_trial_data, run_trial

    with tempfile.TemporaryDirectory() as tmp:
        root = _project(Path(tmp))
        layout = Layout.at(root)
        params = load_params(layout.params, args.set, root=root)
        data = load_trial_data(params, layout)
        device = pick_device(params.train.device)
        threads = params.train.threads or os.cpu_count() or 1

        def bare() -> float:
            t0 = time.perf_counter()
            run_trial(params, data, device, threads, lambda _e, _m: False)
            return time.perf_counter() - t0

        def in_thread() -> float:  # where a task runner runs it: a worker thread
            with ThreadPoolExecutor(1) as pool:
                return pool.submit(bare).result()

        bare()  # warm-up: first-call costs (allocator, kernels) paid outside the figures
        half = max(1, args.trials // 2)
        bare_s, thread_s = [], []
        for _ in range(half):
            bare_s.append(bare())
            thread_s.append(in_thread())
        sets = [*args.set, f"tune.trials={args.trials}", "tune.parallel=1",
                "tune.pruner=none", "tune.baseline=false", "tune.study=overhead",
                f"tune.space={{train.lr: {{choices: [{params.train.lr}]}}}}"]
        api = _server(Path(tmp)) if args.server else contextlib.nullcontext()
        with api:
            t0 = time.perf_counter()
            summary = runpy.run_path(str(root / "flows" / "tune.py"))["main"](
                params=str(layout.params), overrides=sets, root=str(root))
            flow_s = time.perf_counter() - t0
        for _ in range(args.trials - half):
            bare_s.append(bare())
            thread_s.append(in_thread())
        torch.set_num_threads(threads)
        parts = _bookkeeping(params, layout, args.trials)
    trial_s = summary["trial_wall_s"]
    bare_med, flow_med = statistics.median(bare_s), statistics.median(trial_s)
    thread_med = statistics.median(thread_s)
    return {
        "trials": args.trials, "epochs": params.train.epochs, "threads": threads,
        "prefect_api": "running server" if args.server else "temporary (in-process)",
        "bare_s": [round(s, 3) for s in bare_s], "flow_trial_s": trial_s,
        "bare_thread_s": [round(s, 3) for s in thread_s],
        "bare_median_s": round(bare_med, 3), "flow_trial_median_s": round(flow_med, 3),
        "bare_thread_median_s": round(thread_med, 3),
        "overhead_vs_thread_s": round(flow_med - thread_med, 3),
        "overhead_per_trial_s": round(flow_med - bare_med, 3),
        "overhead_per_trial_pct": round(100 * (flow_med - bare_med) / bare_med, 1),
        "flow_wall_s": round(flow_s, 2),
        "flow_fixed_s": round(flow_s - sum(trial_s), 2),
        "bookkeeping_median_s": parts,
    }


def _bookkeeping(params, layout, reps: int) -> dict[str, float]:
    """What a trial's bookkeeping costs without training, per trial (medians): the Optuna
    calls on the sqlite study (ask, attributes, suggest, report + should_prune per epoch,
    tell) and the MLflow calls on the sqlite store (child run, params, per-epoch metrics,
    end). The rest of the orchestration overhead is Prefect's task run."""
    from visionflow.tune import study as studies
    from visionflow.tune.mlflow_runs import StudyRuns
    from visionflow.tune.space import fixed_settings, suggest

    p = params.model_copy(update={"tune": params.tune.model_copy(
        update={"study": "bookkeeping", "baseline": False, "pruner": "median"})})
    storage = studies.open_storage(studies.storage_url(p, layout))
    settings = fixed_settings(p, "bench")
    study = studies.open_study(p, storage, settings)
    runs = StudyRuns(layout, study, settings)
    epochs = p.train.epochs
    optuna_s, mlflow_s = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        trial = study.ask()
        trial.set_user_attr(studies.WORKER_ATTR, studies.worker_id())
        values = suggest(trial, p.tune.space)
        for epoch in range(1, epochs + 1):
            trial.report(0.5, epoch)
            trial.should_prune()
        study.tell(trial, 0.5)
        optuna_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        run_id = runs.start_trial(trial.number, values)
        for epoch in range(1, epochs + 1):
            runs.log_epoch(run_id, epoch, {"val_top1": 0.5, "train_loss": 1.0, "lr": 0.1,
                                           "train_top1": 0.5, "epoch_seconds": 0.5})
        runs.end_trial(run_id, "complete", 0.5, 1.0)
        mlflow_s.append(time.perf_counter() - t0)
    return {"optuna": round(statistics.median(optuna_s), 3),
            "mlflow": round(statistics.median(mlflow_s), 3)}


def _stage_top1(root: Path, sets: list[str]) -> float:
    from visionflow.core.configfile import load_params
    from visionflow.core.layout import Layout
    from visionflow.orchestration.stage_runner import run_stage

    layout = Layout.at(root)
    params = load_params(layout.params, sets, root=root)
    for stage in ("train", "evaluate"):
        out = run_stage(stage, params, layout)
    return float(out["top1"])


def gain(args: argparse.Namespace) -> dict:
    import optuna

    from visionflow.core.configfile import load_params
    from visionflow.core.layout import Layout
    from visionflow.tune.search import best_of

    with tempfile.TemporaryDirectory() as tmp:
        root = _project(Path(tmp))
        sets = [part for s in args.set for part in ("-s", s)]
        t0 = time.perf_counter()
        proc = subprocess.run([str(BIN / "vflow"), "tune", "--root", str(root), *sets],
                              cwd=root, env=_env(), capture_output=True, text=True)
        tune_s = time.perf_counter() - t0
        if proc.returncode:
            sys.exit(f"vflow tune failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        layout = Layout.at(root)
        params = load_params(layout.params, args.set, root=root)
        study = optuna.load_study(study_name=params.tune.study,
                                  storage=f"sqlite:///{layout.tune_db}")
        best = best_of(study)
        states = [t.state.name for t in study.trials]
        base = next((t for t in study.trials if t.user_attrs.get("baseline")), None)
        tuned = [f"{k}={v}" for k, v in best.params.items()]
        rows = {"default": [], "tuned": []}
        for seed in range(args.seeds):  # alternate: drift hits both alike
            rows["default"].append(_stage_top1(root, [*args.set, f"seed={seed}"]))
            rows["tuned"].append(_stage_top1(root, [*args.set, *tuned, f"seed={seed}"]))
    return {
        "tune_wall_s": round(tune_s, 1), "trials": len(states),
        "complete": states.count("COMPLETE"), "pruned": states.count("PRUNED"),
        "baseline_val_top1": base.value if base else None,
        "best_val_top1": best.value, "best_trial": best.number, "best_params": best.params,
        "test_top1": rows,
        "test_top1_mean": {k: round(statistics.mean(v), 4) for k, v in rows.items()},
        "summary_tail": proc.stdout.strip().splitlines()[-4:],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["overhead", "gain"])
    ap.add_argument("--trials", type=int, default=5, help="overhead: trials of each kind")
    ap.add_argument("--server", action="store_true",
                    help="overhead: the flow talks to a running Prefect server")
    ap.add_argument("--seeds", type=int, default=3, help="gain: training seeds per config")
    ap.add_argument("-s", "--set", action="append", default=[], help="params override")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args()
    os.environ.update(_env())
    result = overhead(args) if args.what == "overhead" else gain(args)
    result = {"what": args.what, "overrides": args.set, **result}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
