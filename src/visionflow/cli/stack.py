"""`vflow stack up | down | status | worker`: the team stack on one machine.

Only typer at import time: the stack modules load inside the commands.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

stack_app = typer.Typer(
    help="The team stack on this machine: PostgreSQL, an S3 store, the MLflow tracking "
         "server, the Prefect server and workers (README \"Team setup\").",
    no_args_is_help=True)

RootOpt = Annotated[Path, typer.Option("--root", help="project root (the checkout)")]


def _stack(root: Path):
    from visionflow.core.layout import Layout
    from visionflow.stack.core import Stack

    return Stack(Layout.at(root))


@stack_app.command("up")
def up(root: RootOpt = Path("."),
       host: Annotated[str, typer.Option(help="address every server binds")] = "127.0.0.1",
       workers: Annotated[int, typer.Option(min=0, help="process workers to start")] = 1,
       ui: Annotated[bool, typer.Option(help="serve the Prefect UI")] = True,
       deploy: Annotated[bool, typer.Option(help="create the work pool and the deployments "
                                                 "of prefect.yaml")] = True,
       timeout: Annotated[float, typer.Option(help="seconds to wait for each server")] = 300,
       ) -> None:
    """Start every service that is not running (data under .cache/stack/)."""
    from visionflow.stack.core import Options

    stack = _stack(root)
    created = stack.up(Options(host=host, workers=workers, ui=ui, deploy=deploy,
                               timeout=timeout), log=typer.echo)
    for st in stack.status():
        typer.echo(st.line())
    layout = stack.layout
    if created:
        typer.echo(f"\ncredentials (shown this once; kept in {layout.stack_credentials}):")
        typer.echo(layout.stack_credentials.read_text().rstrip())
    else:
        typer.echo(f"\ncredentials: {layout.stack_credentials}")
    typer.echo(f"use the stack from a shell:  source {layout.stack_env}")
    if layout.dvc_dir.is_dir():
        typer.echo("DVC remote 'stack' (default, in .dvc/config.local): dvc push / dvc pull")


@stack_app.command("down")
def down(root: RootOpt = Path("."),
         purge: Annotated[bool, typer.Option(help="also delete the stack's data and "
                                                  "credentials")] = False) -> None:
    """Stop the workers and servers (data kept unless --purge)."""
    stack = _stack(root)
    stack.down(log=typer.echo, purge=purge)
    if purge:
        typer.echo(f"deleted {stack.layout.stack_dir}")


@stack_app.command("status")
def status(root: RootOpt = Path(".")) -> None:
    """Each service: up or down, its URL and pid (exit code 1 when one is down)."""
    stack = _stack(root)
    rows = stack.status()
    for st in rows:
        typer.echo(st.line())
    if not rows or not all(st.healthy for st in rows):
        raise typer.Exit(1)


@stack_app.command("worker")
def worker(root: RootOpt = Path("."),
           name: Annotated[str | None, typer.Option(help="worker name")] = None,
           limit: Annotated[int, typer.Option(min=1, help="flow runs at once")] = 1,
           queue: Annotated[str, typer.Option(help="the pool's work queue it takes runs "
                                                "from (e.g. one per host)")] = "default",
           ) -> None:
    """Run a process worker here, in the foreground, for another host of the team.

    It takes runs of the stack's pool and runs them in this checkout. Needs PREFECT_API_URL
    (and MLFLOW_TRACKING_URI, VFLOW_REGISTRY_LOCK_URL) in the environment: `source env.sh`."""
    import socket

    from visionflow.core.env import quiet_env
    from visionflow.core.errors import VisionflowError
    from visionflow.stack import services

    if not os.environ.get("PREFECT_API_URL"):
        raise VisionflowError("PREFECT_API_URL is not set: source the stack's env.sh (or "
                              "set the team's URLs) first")
    quiet_env()
    os.environ["VFLOW_CHECKOUT"] = str(root.resolve())
    os.chdir(root)
    cmd = services.worker_command(name or f"{socket.gethostname()}-{root.resolve().name}",
                                  limit, queue)
    os.execv(cmd[0], cmd)
