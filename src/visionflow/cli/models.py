"""`vflow models ...` (browse and move aliases in the registry) and `vflow predict`.

Only typer is imported at module level: mlflow, torch and rich load inside the commands,
so `vflow --help` stays instant.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

models_app = typer.Typer(help="Browse the model registry and move the champion alias.",
                         no_args_is_help=True)

NameOpt = Annotated[str | None, typer.Option(
    "--name", "-n", help="registered model (default: register.model_name in params.yaml)")]
RootOpt = Annotated[Path, typer.Option("--root", help="project root (its mlruns/ store)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of tables")]
AliasOpt = Annotated[str, typer.Option("--alias", help="the serving alias")]
ReasonOpt = Annotated[str, typer.Option("--reason", "-r", help="why (recorded with your name)")]


def _open(root: Path, name: str | None):
    from visionflow.mlops import registry

    _registry_here(root)
    return registry.client_for(root), name or registry.model_name_for(root)


def _registry_here(root: Path) -> None:
    """A mistyped --root is one line, not a new empty store made there (MLflow creates a
    sqlite store where it is pointed)."""
    from visionflow.core.errors import DataError
    from visionflow.core.layout import Layout
    from visionflow.mlops.lineage import registry_uri_if_any

    layout = Layout.at(root)
    if registry_uri_if_any(layout) is None:
        raise DataError(f"{layout.mlflow_db}: no model registry here (and no "
                        "MLFLOW_TRACKING_URI): run the pipeline first, or pass --root")


def _console():
    from rich.console import Console

    return Console()


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _delta(v: float | None, metric: str) -> str:
    if v is None:
        return "-"
    better = v < 0 if metric == "ece" else v > 0
    color = "green" if better else ("red" if v != 0 else "dim")
    return f"[{color}]{v:+.4f}[/]"


def _echo_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


LIST_COLUMNS = ("v", "aliases", "gate", "top1", "f1_macro", "model", "data")
SEGMENTATION_METRICS = ("miou", "mean_dice")  # in place of top1, f1_macro


def versions_table(name: str, infos: list[Any]):
    """The versions as a table that reads whole in an 80-column terminal: one line per
    version (aliases stacked), short values only; `show` and `--json` have the rest."""
    from rich import box
    from rich.table import Table

    from visionflow.mlops.provenance import lineage

    table = Table(title=f"{name}: {len(infos)} version(s)", box=box.SIMPLE_HEAD,
                  padding=(0, 1), caption="data: lineage.data_hash; by hand: made champion "
                  "by `vflow models promote`; more: vflow models show V",
                  caption_justify="left")
    scores = (SEGMENTATION_METRICS if any(i.tags.get("task") == "segmentation" for i in infos)
              else LIST_COLUMNS[3:5])
    for col in (*LIST_COLUMNS[:3], *scores, *LIST_COLUMNS[5:]):
        numeric = col in ("v", *scores)
        table.add_column(col, justify="right" if numeric else "left",
                         no_wrap=col != "model", overflow="fold")
    for i in infos:
        gate = i.gate or "-"
        gate = f"[green]{gate}[/]" if gate == "promoted" else (
            f"[red]{gate}[/]" if gate != "-" else gate)
        if i.tags.get("champion_action") == "promote":  # made champion by `models promote`
            gate += "\n[yellow]by hand[/]"
        variant = i.tags.get("compact_variant")
        model = f"compact {variant}" if variant else i.tags.get("model", "-")
        table.add_row(i.version, "\n".join(i.aliases) or "-", gate,
                      _fmt(i.metrics.get(scores[0])), _fmt(i.metrics.get(scores[1])), model,
                      lineage(i.tags, "data_hash")[:8] or "-")
    return table


@models_app.command("list")
def list_cmd(name: NameOpt = None, root: RootOpt = Path("."), as_json: JsonOpt = False) -> None:
    """Every version with its aliases, gate decision and test metrics, newest first."""
    from visionflow.mlops import registry

    client, name = _open(root, name)
    infos = registry.list_versions(client, name)
    if as_json:
        _echo_json([i.as_dict() | {"description": None} for i in infos])
        return
    _console().print(versions_table(name, infos))


@models_app.command("show")
def show_cmd(version: Annotated[str, typer.Argument(help="version, vN, or an alias")],
             name: NameOpt = None, root: RootOpt = Path("."), as_json: JsonOpt = False,
             card: Annotated[bool, typer.Option("--card/--no-card",
                                                help="print the model card")] = True) -> None:
    """One version: aliases, gate decision, metrics, tags and its model card."""
    from rich.markdown import Markdown
    from rich.table import Table

    from visionflow.mlops import registry

    client, name = _open(root, name)
    info = registry.show_version(client, name, version)
    if as_json:
        _echo_json(info.as_dict())
        return
    con = _console()
    con.print(f"[bold]{name}[/] version [bold]{info.version}[/]  aliases: "
              f"[cyan]{', '.join(info.aliases) or '-'}[/]  created {info.created}  "
              f"run {info.run_id}")
    gate, parent = info.tags.get("gate_decision"), info.tags.get("parent_version")
    if gate is None and parent:  # a compact version: its parent went through the gate
        con.print(f"gate: [bold]none[/] - the compressed copy of v{parent}, which the gate judged")
    else:
        con.print(f"gate: [bold]{gate or '-'}[/] - {info.tags.get('gate_reason', '')}")
    if info.tags.get("champion_action"):
        con.print(f"alias set by {info.tags.get('champion_by')} ({info.tags['champion_action']},"
                  f" {info.tags.get('champion_at')}): {info.tags.get('champion_reason', '')}")
    metrics = Table(title="test metrics")
    metrics.add_column("metric")
    metrics.add_column("value", justify="right")
    for k, v in info.metrics.items():
        metrics.add_row(k, _fmt(v))
    con.print(metrics)
    tags = Table(title="tags")
    tags.add_column("tag")
    tags.add_column("value", overflow="fold")
    for k in sorted(info.tags):
        if k not in ("metrics", "params", "compact_metrics"):
            tags.add_row(k, info.tags[k])
    con.print(tags)
    if card and info.description:
        from visionflow.mlops.card import for_terminal

        con.print(Markdown(for_terminal(info.description)))


@models_app.command("compare")
def compare_cmd(v1: Annotated[str, typer.Argument(help="version or alias (baseline)")],
                v2: Annotated[str, typer.Argument(help="version or alias")],
                name: NameOpt = None, root: RootOpt = Path("."),
                as_json: JsonOpt = False) -> None:
    """Two versions side by side: metrics with the change, and the tags that differ."""
    from rich.table import Table

    from visionflow.mlops import registry

    client, name = _open(root, name)
    a, b, rows, tag_rows = registry.compare_versions(client, name, v1, v2)
    if as_json:
        _echo_json({"a": a.version, "b": b.version,
                    "metrics": [{"metric": m, "a": x, "b": y, "delta": d}
                                for m, x, y, d in rows],
                    "tags": [{"tag": t, "a": x, "b": y} for t, x, y in tag_rows]})
        return
    la = f"v{a.version} ({', '.join(a.aliases)})" if a.aliases else f"v{a.version}"
    lb = f"v{b.version} ({', '.join(b.aliases)})" if b.aliases else f"v{b.version}"
    table = Table(title=f"{name}: {la} vs {lb}")
    table.add_column("metric")
    table.add_column(la, justify="right")
    table.add_column(lb, justify="right")
    table.add_column("change", justify="right")
    table.add_row("gate", a.gate or "-", b.gate or "-", "")
    for m, x, y, d in rows:
        table.add_row(m, _fmt(x), _fmt(y), _delta(d, m))
    con = _console()
    con.print(table)
    if tag_rows:
        tags = Table(title="tags that differ")
        tags.add_column("tag")
        tags.add_column(la, overflow="fold")
        tags.add_column(lb, overflow="fold")
        for t, x, y in tag_rows:
            tags.add_row(t, x or "-", y or "-")  # whole: rich folds them (a tag is <= 5,000)
        con.print(tags)


@models_app.command("promote")
def promote_cmd(version: Annotated[str, typer.Argument(help="version to make champion")],
                reason: ReasonOpt, name: NameOpt = None, root: RootOpt = Path("."),
                alias: AliasOpt = "champion") -> None:
    """Make VERSION the champion by hand (the old one keeps `previous`)."""
    from visionflow.mlops import registry

    client, name = _open(root, name)
    old, new = registry.promote(client, name, version, reason, alias)
    typer.echo(f"{name}: @{alias} -> v{new}" + (f" (v{old} is @previous)" if old else "")
               + f"; by {registry.whoami()}: {reason}")
    _follow(client, name, new, alias, root, f"promoted: {reason}")


@models_app.command("rollback")
def rollback_cmd(reason: ReasonOpt, to: Annotated[str | None, typer.Option(
                     "--to", help="version to roll back to (default: @previous)")] = None,
                 name: NameOpt = None, root: RootOpt = Path("."),
                 alias: AliasOpt = "champion") -> None:
    """Move the champion back to `previous` (or --to VERSION), recording who and why."""
    from visionflow.mlops import registry

    client, name = _open(root, name)
    old, new = registry.rollback(client, name, reason, to, alias)
    typer.echo(f"{name}: @{alias} rolled back v{old} -> v{new}; by {registry.whoami()}: "
               f"{reason}")
    _follow(client, name, new, alias, root, f"rollback: {reason}")


def _follow(client: Any, name: str, champion: str, alias: str, root: Path, why: str) -> None:
    """`compact` belongs to the serving alias (`register.alias`): it follows a move by hand."""
    from visionflow.mlops import registry

    if alias == registry.register_setting(root, "alias", "champion"):
        with registry.registry_lock(registry.tracking_uri(client)):
            moved = registry.follow_champion(client, name, champion, why)
        if moved:
            typer.echo(f"{name}: {moved}")


def predict_command(
    paths: Annotated[list[Path], typer.Argument(help="image files, folders or archives")],
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="model URI (default: models:/<register.model_name>@champion)")]
        = None,
    out: Annotated[str, typer.Option("--out", "-o", help="output file (.csv/.json), - for "
                                                         "stdout")] = "predictions.csv",
    fmt: Annotated[str | None, typer.Option("--format", help="csv or json (default: from "
                                                             "--out)")] = None,
    topk: Annotated[int | None, typer.Option("--topk", "-k", help="labels per image")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b",
                                            help="images per forward pass")] = 256,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda")] = "auto",
    root: RootOpt = Path("."),
    progress: Annotated[bool, typer.Option(
        "--progress/--no-progress", help="a progress bar on a terminal's stderr")] = True,
    task: Annotated[str | None, typer.Option(
        "--task", help="classification or segmentation: the task you expect (a model of "
                       "the other task is an error); default: the model's")] = None,
) -> None:
    """Predict with a registered model: top-k labels (CSV or JSON), or masks.

    A segmentation model writes one PNG mask per image into the folder --out names (without
    its .csv/.json suffix) and an index.csv there."""
    import sys

    from visionflow.core.env import imports_without_gc

    with imports_without_gc():  # torch, torchvision, MLflow
        from visionflow.mlops import registry
        from visionflow.mlops.predict import run_predict

    uri = model or f"models:/{registry.model_name_for(root)}@champion"
    if uri.startswith("models:/"):
        _registry_here(root)
    if task not in (None, "classification", "segmentation"):
        raise typer.BadParameter(f"--task {task!r}: choose classification or segmentation")
    summary = run_predict(uri, list(paths), out, fmt, batch_size, topk, device, root,
                          progress and sys.stderr.isatty(), task=task)
    msg = (f"{summary.images} image(s) predicted with {uri} on {summary.device}"
           + (f" -> {summary.out}" if summary.out != "-" else ""))
    if summary.failed:
        msg += f"; {summary.failed} could not be read (see the error column), e.g. " \
               f"{summary.errors[0]}"
    if summary.failed and not summary.images:  # the rows are written; the exit says it
        from visionflow.core.errors import DataError

        raise DataError(msg)
    typer.echo(msg, err=True)
