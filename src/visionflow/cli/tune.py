"""`vflow tune`: the hyperparameter search (the `tune` flow), and `--apply` to write the best
trial's params into params.yaml. Only typer at import time."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from visionflow.core.errors import VisionflowError

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params file")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="override KEY=VALUE")]
RootOpt = Annotated[Path, typer.Option("--root", help="project root")]
ApplyOpt = Annotated[bool, typer.Option(
    "--apply", help="write the best trial's params into params.yaml (shows the diff)")]


def tune_command(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None,
                 root: RootOpt = Path("."), apply: ApplyOpt = False) -> None:
    """Search hyperparameters (`tune:` in params.yaml); --apply writes the best.

    Trials run as parallel Prefect tasks, scored on the val split, pruned per epoch and
    tracked in MLflow; a rerun continues the study. Nothing in the project changes unless
    --apply."""
    from visionflow.core.configfile import load_params
    from visionflow.core.env import imports_without_gc
    from visionflow.core.layout import Layout

    with imports_without_gc():  # torch, MLflow, Optuna: the trials' libraries
        from visionflow.data.packed import source_data_hash
        from visionflow.tune import search, study
        from visionflow.tune.apply import apply_best
        from visionflow.tune.space import fixed_settings

    layout = Layout.at(root)
    path = params if params.is_absolute() else layout.root / params
    cfg = load_params(path, set_ or [], root=layout.root)
    existing = study.existing(cfg, layout)
    done = (existing is not None and existing.user_attrs.get("settings")
            == fixed_settings(cfg, source_data_hash(layout))
            and study.counts(existing).finished >= cfg.tune.trials)
    if done:  # nothing to run: no flow, no Prefect
        c = study.counts(existing)
        typer.echo(f"study {cfg.tune.study}: complete ({c.finished}/{cfg.tune.trials} trials "
                   f"finished: {c.complete} complete, {c.pruned} pruned); raise tune.trials "
                   "to search on")
    else:
        from visionflow.orchestration import flowfile

        summary = flowfile.load(layout.tune_flow_file).main(
            params=str(path), overrides=set_ or [], root=str(layout.root))
        for line in search.summary_lines(summary):
            typer.echo(line)
        existing = study.existing(cfg, layout)
    best = search.best_of(existing) if existing is not None else None
    if best is None:
        raise VisionflowError(f"study {cfg.tune.study}: no complete trial yet, nothing to "
                              "apply" if apply else f"study {cfg.tune.study}: no complete trial")
    if not apply:
        if done:  # no search ran (a search's summary names the best trial)
            typer.echo(f"best: trial {best.number}, val top-1 {best.value:.4f}")
        typer.echo(f"`vflow tune --apply` writes trial {best.number}'s params into params.yaml")
        return
    diff, changed = apply_best(path, layout.root, dict(best.params))
    if not changed:
        typer.echo(f"{path.name} already holds trial {best.number}'s params")
        return
    typer.echo(diff, nl=False)
    typer.echo(f"{path.name}: trial {best.number}'s params written (val top-1 "
               f"{best.value:.4f}); `dvc repro` or `vflow run` trains, scores and gates it")
