"""`vflow --help` lists each command with a one-line summary: in rich mode Typer keeps the
single line breaks of a docstring's first paragraph, so a wrapped first paragraph shows in
the listing as broken lines."""

from __future__ import annotations

import inspect

import typer
from typer.testing import CliRunner


def _commands(group, path=("vflow",)):
    for name, cmd in getattr(group, "commands", {}).items():
        yield (*path, name), cmd
        yield from _commands(cmd, (*path, name))


def test_every_command_has_a_one_line_summary_and_every_option_a_help():
    from visionflow.cli.main import app

    commands = list(_commands(typer.main.get_command(app)))
    assert len(commands) > 20  # the whole tree, groups and their commands
    summaries = {" ".join(path): inspect.cleandoc(cmd.help or "").split("\n\n")[0]
                 for path, cmd in commands}
    broken = {path: text for path, text in summaries.items() if "\n" in text}
    assert not broken, broken
    missing = [path for path, text in summaries.items() if not text.strip()]
    assert not missing, missing
    bare = [(path, p.opts) for path, cmd in commands for p in cmd.params
            if p.name != "help" and not getattr(p, "help", None)]
    assert not bare, bare  # every option and argument says what it does


def test_the_listing_shows_each_summary_whole():
    from visionflow.cli.main import app

    out = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "240"}).output
    assert "Predict with a registered model: top-k labels (CSV or JSON), or masks." in out
    assert "Search hyperparameters (`tune:` in params.yaml); --apply writes the best." in out
