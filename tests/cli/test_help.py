"""`vflow --help` lists each command with a one-line summary (a wrapped first paragraph
would show in the listing as broken lines), and a command's help reads its docstring's later
paragraphs as paragraphs: the CLI renders help as Markdown, where Typer's rich mode kept each
source line break."""

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
    assert "Search hyperparameters (tune: in params.yaml); --apply writes the best." in out


def test_a_commands_later_paragraphs_wrap_to_the_terminal():
    from visionflow.cli.main import app

    out = CliRunner().invoke(app, ["predict", "--help"], env={"COLUMNS": "200"}).output
    assert ("A segmentation model writes one PNG mask per image into the folder --out names "
            "(without its .csv/.json suffix) and an index.csv there.") in out, out
