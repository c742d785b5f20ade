"""`vflow data ...`: dataset versioning with DVC (mounted by `visionflow.cli.main`).

Only typer is imported at module level, so `vflow --help` stays fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

data_app = typer.Typer(help="Dataset versioning with DVC: init, add, status, checkout.",
                       no_args_is_help=True)

RootOpt = Annotated[Path, typer.Option("--root", help="project root")]
ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params file")]
TargetOpt = Annotated[str, typer.Option("--to", help="folder inside the project (DVC-tracked)")]


@data_app.command("init")
def data_init(
    root: RootOpt = Path("."),
    task: Annotated[str, typer.Option(help="classification: the digits; segmentation: "
                                           "generated shapes with index-PNG masks")
                    ] = "classification",
) -> None:
    """Write the built-in dataset to data/ (if absent) and track it with DVC."""
    from visionflow.core.layout import Layout
    from visionflow.data.add import init_default_data

    path = init_default_data(Layout.at(root), task=task)
    typer.echo(f"data ready: {path} (tracked by data.dvc)")


@data_app.command("add")
def data_add(
    path: Annotated[str, typer.Argument(help="an ImageFolder directory, a .tar/.tar.gz/"
                                             ".tgz/.zip archive of one, torchvision:CIFAR10 "
                                             "(downloaded once, online), or s3://bucket/prefix "
                                             "(mirrored: a scheduled retrain syncs what changed)")],
    root: RootOpt = Path("."),
    target: TargetOpt = "data",
    force: Annotated[bool, typer.Option(help="replace data/ even if it has changes "
                                             "not recorded in data.dvc")] = False,
    push: Annotated[bool, typer.Option(help="dvc push the new version to the "
                                            "default remote")] = False,
    merge: Annotated[bool, typer.Option(help="add PATH's images to the current version "
                                             "instead of replacing it")] = False,
) -> None:
    """Import PATH into data/ safely and `dvc add` it, so data.dvc records the new version.

    The new version is PATH's images alone, or with --merge the current images and PATH's.
    An s3:// prefix is mirrored (only what changed is downloaded): data.dvc also records it,
    and a scheduled retrain (--only-new-data) syncs it again."""
    from visionflow.core.configfile import parse_params, read_params_file
    from visionflow.core.layout import Layout
    from visionflow.data.add import import_data
    from visionflow.data.archive import ArchiveLimits

    layout = Layout.at(root)
    params = (parse_params(read_params_file(layout.params), str(layout.params))
              if layout.params.is_file() else None)  # (data/ may not exist yet)
    limits = ArchiveLimits.from_params(params.data if params else None)
    out = import_data(layout, path, target=target, force=force, push=push, limits=limits,
                      merge=merge)
    if merge:
        what = f"{out['files_before']} files before, {out['files_now']} now"
    elif out["files_before"]:
        what = (f"the new version, in place of the {out['files_before']} files before "
                "(--merge adds to them)")
    else:
        what = "the first version"
    masks = f" and {out['masks']} masks" if out["masks"] else ""
    typer.echo(f"imported {out['images']} images{masks} ({out['files']} files) from "
               f"{out['source']} into {out['target']}: {what}")
    if out["ignored"]:
        typer.echo(f"  ignored (no images): {', '.join(out['ignored'])}")
    for item in out["skipped"][:10]:
        typer.echo(f"  skipped {item}")
    if len(out["skipped"]) > 10:
        typer.echo(f"  ... and {len(out['skipped']) - 10} more skipped")
    typer.echo(f"{out['dvc_file']}: md5 {out['dvc_data_md5']}"
               + (f" (pushed to '{out['remote']}')" if out["pushed"] else ""))
    if "sync" in out:
        s = out["sync"]
        resumed = f", {s['resumed']} from the interrupted import" if s["resumed"] else ""
        typer.echo(f"  {out['source']}: {s['downloaded']} objects downloaded "
                   f"({s['bytes'] / 2**20:.1f} MiB){resumed}, {s['kept']} unchanged, "
                   f"{s['removed']} removed; a scheduled retrain (--only-new-data) syncs it "
                   "again, as does this command")
    elif out["imported_from"]:
        typer.echo(f"  imported from {out['imported_from']}: `dvc update {out['dvc_file']}` "
                   "(run by a scheduled retrain) fetches what changed there")
    git = layout.git_dir.exists()
    typer.echo("next: " + (f"git add {out['dvc_file']} && git commit -m 'data: new version'; "
                           if git else "")
               + ("" if out["pushed"] else f"dvc push (remote '{out['remote']}')"))


@data_app.command("status")
def data_status(
    root: RootOpt = Path("."),
    params: ParamsOpt = Path("params.yaml"),
    target: TargetOpt = "data",
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    compute_hash: Annotated[bool, typer.Option("--hash/--no-hash",
                                               help="compute the current data hash "
                                                    "(reads the data; cached)")] = True,
) -> None:
    """The current data version (data hash, data.dvc md5) next to the champion's."""
    from visionflow.core.configfile import load_params
    from visionflow.core.layout import Layout
    from visionflow.orchestration.trigger import data_status as status

    layout = Layout.at(root)
    cfg = load_params(params if params.is_absolute() else layout.root / params,
                      root=layout.root)
    out = status(layout, cfg, target, compute_hash)
    if as_json:
        typer.echo(json.dumps(out, indent=2, default=str))
        return
    _print_status(out)


@data_app.command("checkout")
def data_checkout(
    ref: Annotated[str, typer.Argument(help="a registered version: 3, v3, or an alias "
                                            "(champion)")],
    root: RootOpt = Path("."),
    params: ParamsOpt = Path("params.yaml"),
    target: TargetOpt = "data",
    force: Annotated[bool, typer.Option(help="replace data/ even if it has changes "
                                             "not recorded in data.dvc")] = False,
) -> None:
    """Bring back the data a registered version was trained on into data/.

    Its data.dvc comes from the version's run (or its git commit, when clean) and must
    record the version's lineage.dvc_data_md5; the files come from the DVC cache or the
    default remote."""
    from visionflow.core.configfile import load_params
    from visionflow.core.layout import Layout
    from visionflow.data.add import checkout_version
    from visionflow.data.dvc import relative
    from visionflow.mlops.lineage import version_dvc_file

    layout = Layout.at(root)
    cfg = load_params(params if params.is_absolute() else layout.root / params,
                      root=layout.root)
    name = cfg.register_.model_name
    found = version_dvc_file(layout, name, ref, relative(layout, layout.dvc_file(target)))
    out = checkout_version(layout, target, found["text"], force)
    typer.echo(f"{target}/: the data {name} v{found['version']} was trained on "
               f"({out['dvc_file']} md5 {out['dvc_data_md5']}, {out['nfiles']} files; "
               f"{out['dvc_file']} from {found['where']})")
    if out["imported_from"]:
        typer.echo(f"  imported from {out['imported_from']}: a scheduled retrain "
                   "(--only-new-data) syncs it to the bucket as it is now")
    typer.echo(f"next: git add {out['dvc_file']} && git commit -m "
               f"'data: as {name} v{found['version']}'")


def _print_status(out: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    cur, champ = out["current"], out["champion"]
    table = Table(title="data version", title_justify="left")
    table.add_column("")
    table.add_column("current")
    table.add_column("champion")
    table.add_row("version", "workspace", f"{champ['model']} v{champ['version']} @{champ['alias']}"
                  if champ.get("status") == "ok" else champ["status"])
    table.add_row("data_hash", cur["data_hash"] or "-", champ.get("data_hash") or "-")
    table.add_row("dvc_data_md5", cur["dvc_data_md5"] or "-", champ.get("dvc_data_md5") or "-")
    table.add_row("files (data.dvc)", str(cur["nfiles"] or "-"), "")
    table.add_row("workspace", cur["workspace"], "")
    if cur.get("imported_from"):
        table.add_row("imported from", cur["imported_from"], "")
    last = out["last_validated"]
    if last:
        table.add_row("last validated hash", f"{last.get('data_hash') or '-'} "
                      f"({'passed' if last.get('success') else 'failed'})", "")
    remote = out["remote"]
    table.add_row("DVC remote", f"{remote['name'] or '-'} {remote['url']}".strip(), "")
    console = Console(width=None if sys.stdout.isatty() else 120)
    console.print(table)
    same = out["same_as_champion"]
    console.print({True: "same data as the champion", False: "data differs from the champion",
                   None: "no champion data to compare"}[same])
