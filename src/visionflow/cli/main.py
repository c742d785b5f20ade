"""`vflow`: the command line. Heavy libraries load inside commands, so `--help` is instant."""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Annotated

import typer

from visionflow.cli.data import data_app
from visionflow.cli.models import models_app, predict_command
from visionflow.cli.servers import schedule_command, server_app, ui_app
from visionflow.cli.stack import stack_app
from visionflow.cli.tune import tune_command
from visionflow.core.config import STAGE_NAMES
from visionflow.core.errors import VisionflowError

app = typer.Typer(help="visionflow: validate, pack, train, evaluate, compress, register.",
                  no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode="markdown",  # a docstring's lines wrap as one paragraph
                  context_settings={"help_option_names": ["-h", "--help"]})
stage_app = typer.Typer(help="Run one pipeline stage (what dvc.yaml calls).",
                        no_args_is_help=True)
app.add_typer(stage_app, name="stage")
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")
app.command("predict")(predict_command)
app.add_typer(server_app, name="server")
app.add_typer(ui_app, name="ui")
app.command("schedule")(schedule_command)
app.command("tune")(tune_command)
app.add_typer(stack_app, name="stack")

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params file")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="override KEY=VALUE")]
RootOpt = Annotated[Path, typer.Option("--root", help="project root")]
_DEBUG = {"on": False}


@app.callback()
def _options(debug: Annotated[bool, typer.Option(
        "--debug", help="on an error, print the traceback after its one line")] = False) -> None:
    _DEBUG["on"] = debug


def _load(params: Path, overrides: list[str] | None, root: Path):
    from visionflow.core.configfile import load_params
    from visionflow.core.layout import Layout

    layout = Layout.at(root)
    path = params if params.is_absolute() else layout.root / params
    return load_params(path, overrides or [], root=layout.root), layout


def _stage_command(name: str):
    def command(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None,
                root: RootOpt = Path(".")) -> None:
        from visionflow.orchestration.launch import LaunchResult
        from visionflow.orchestration.stage_runner import run_stage
        from visionflow.stages import print_result

        cfg, layout = _load(params, set_, root)
        result = run_stage(name, cfg, layout)  # through torchrun: rank 0 said "train done"
        print_result("launch" if isinstance(result, LaunchResult) else name, result)

    command.__doc__ = f"Run the {name} stage (the same as `python3 -m visionflow.stages.{name}`)."
    return command


for _name in STAGE_NAMES:
    stage_app.command(_name)(_stage_command(_name))


@app.command()
def launch(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None,
           root: RootOpt = Path("."),
           local_addr: Annotated[str | None, typer.Option(
               "--local-addr", help="this node's address the others reach (rank order)")] = None,
           print_only: Annotated[bool, typer.Option("--print", help="print the torchrun "
                                                    "command, run nothing")] = False) -> None:
    """Train through torchrun: train.nodes x train.procs_per_node processes.

    Run the same command on every node."""
    from visionflow.orchestration import launch as launcher
    from visionflow.stages import print_result

    cfg, layout = _load(params, set_, root)
    if print_only:
        typer.echo(" ".join(launcher.command(cfg, launcher.resolved_params(cfg, layout),
                                             layout.root, local_addr)))
        return
    print_result("launch", launcher.train(cfg, layout, local_addr, need_outputs=False))


@app.command()
def run(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None,
        root: RootOpt = Path("."),
        force: Annotated[bool, typer.Option(
            help="rerun every stage, skip the data check")] = False) -> None:
    """Run the whole pipeline once as the Prefect `retrain` flow."""
    from visionflow.core.layout import Layout
    from visionflow.orchestration import flowfile
    from visionflow.orchestration.retrain import run_and_print

    layout = Layout.at(root)
    flows = flowfile.load(layout.flow_file)
    run_and_print(flows.retrain, str(params), set_ or [], str(layout.root), force=force)


def main() -> None:
    try:
        app()
    except VisionflowError as err:
        if _DEBUG["on"]:
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
