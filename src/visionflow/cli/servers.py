"""`vflow server`, `vflow ui`, `vflow schedule`: local servers and the nightly deployment.

Only typer at import time: Prefect and MLflow load inside the commands.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

server_app = typer.Typer(help="A local Prefect server on 127.0.0.1 (API + UI, for schedules).",
                         no_args_is_help=True)
ui_app = typer.Typer(help="The MLflow UI on 127.0.0.1 for the project's registry.",
                     no_args_is_help=True)

RootOpt = Annotated[Path, typer.Option("--root", help="project root")]
HostOpt = Annotated[str, typer.Option("--host", help="bind address (loopback by default)")]
PortOpt = Annotated[int | None, typer.Option("--port", help="port (0 = any free port)")]
TimeoutOpt = Annotated[float | None, typer.Option(
    "--timeout", help="seconds to wait for health (default: 180 Prefect, 120 MLflow)")]


def _layout(root: Path):
    from visionflow.core.layout import Layout

    return Layout.at(root)


def _start(service_name: str, root: Path, host: str, port: int | None, timeout: float | None,
           ui: bool = True) -> None:
    from visionflow.orchestration import servers as server

    service = server.PREFECT if service_name == "prefect" else server.MLFLOW
    st = server.start(service, _layout(root), host, port, timeout, ui=ui)
    typer.echo(st.line())
    typer.echo(f"log: {st.log}")
    if service is server.PREFECT:
        typer.echo(f"use it from any shell: export PREFECT_API_URL={st.api_url}")


def _stop(service_name: str, root: Path) -> None:
    from visionflow.orchestration import servers as server

    service = server.PREFECT if service_name == "prefect" else server.MLFLOW
    st = server.stop(service, _layout(root))
    typer.echo(f"{service.title}: stopped (pid {st.pid})" if st.running
               else f"{service.title}: was not running")


def _status(service_name: str, root: Path) -> None:
    from visionflow.orchestration import servers as server

    service = server.PREFECT if service_name == "prefect" else server.MLFLOW
    st = server.status(service, _layout(root))
    typer.echo(st.line())
    if not st.healthy:
        raise typer.Exit(1)


@server_app.command("start")
def server_start(root: RootOpt = Path("."), host: HostOpt = "127.0.0.1",
                 port: PortOpt = 4200, timeout: TimeoutOpt = None,
                 ui: Annotated[bool, typer.Option(help="serve the Prefect UI too")] = True
                 ) -> None:
    """Start `prefect server start` in the background; wait until /api/health answers."""
    _start("prefect", root, host, port, timeout, ui)


@server_app.command("stop")
def server_stop(root: RootOpt = Path(".")) -> None:
    """Stop the project's Prefect server (SIGTERM, then SIGKILL)."""
    _stop("prefect", root)


@server_app.command("status")
def server_status(root: RootOpt = Path(".")) -> None:
    """Is the project's Prefect server up? (exit code 1 when not)."""
    _status("prefect", root)


@ui_app.command("start")
def ui_start(root: RootOpt = Path("."), host: HostOpt = "127.0.0.1", port: PortOpt = 5000,
             timeout: TimeoutOpt = None) -> None:
    """Start the MLflow UI on the project's store in the background."""
    _start("mlflow", root, host, port, timeout)


@ui_app.command("stop")
def ui_stop(root: RootOpt = Path(".")) -> None:
    """Stop the project's MLflow UI."""
    _stop("mlflow", root)


@ui_app.command("status")
def ui_status(root: RootOpt = Path(".")) -> None:
    """Is the project's MLflow UI up? (exit code 1 when not)."""
    _status("mlflow", root)


def schedule_command(
    cron: Annotated[str | None, typer.Option(help="cron expression [flow.schedule.cron]")] = None,
    interval: Annotated[float | None, typer.Option(
        help="run every N seconds instead of a cron schedule")] = None,
    timezone: Annotated[str | None, typer.Option(
        help="time zone of the schedule [flow.schedule.timezone]")] = None,
    name: Annotated[str | None, typer.Option(
        help="deployment name [flow.schedule.deployment]")] = None,
    params: Annotated[Path, typer.Option("--params", "-p", help="params file")] = Path(
        "params.yaml"),
    set_: Annotated[list[str] | None, typer.Option("--set", "-s",
                                                   help="override KEY=VALUE")] = None,
    root: RootOpt = Path("."),
) -> None:
    """Serve the `retrain` deployment on a schedule against the Prefect server (blocks).

    Each run trains only on new data (force one with
    `prefect deployment run retrain/nightly --param force=true`); runs never overlap
    (concurrency limit 1, late runs wait, then are skipped past flow.schedule.max_lateness_s).
    """
    from visionflow.core.configfile import load_params
    from visionflow.core.errors import ConfigError
    from visionflow.core.layout import Layout
    from visionflow.orchestration import flowfile
    from visionflow.orchestration.retrain import serve_deployment
    from visionflow.orchestration.servers import prefect_api

    layout = Layout.at(root)
    path = params if params.is_absolute() else layout.root / params
    cfg = load_params(path, set_ or [], root=layout.root)
    sc = cfg.flow.schedule
    if interval is not None and interval <= 0:
        raise ConfigError(f"--interval={interval}: must be > 0 seconds")
    with prefect_api(layout, require=True) as url:
        os.chdir(layout.root)  # the deployment's entrypoint is flows/retrain.py:retrain
        flows = flowfile.load(layout.flow_file)
        when = f"every {interval:g} s" if interval else f"cron '{cron or sc.cron}'"
        typer.echo(f"serving retrain/{name or sc.deployment} ({when}, "
                   f"{timezone or sc.timezone}) against {url}; Ctrl-C stops and pauses it")
        serve_deployment(flows.retrain, str(params), set_ or [], str(layout.root),
                         cron=cron or sc.cron, interval=interval,
                         timezone=timezone or sc.timezone, name=name or sc.deployment)
