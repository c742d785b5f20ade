"""The six pipeline stages, one module each, each with `run(params, layout)`.

`dvc.yaml` runs each as `python3 -m visionflow.stages.<name>`; `vflow stage <name>` and the
Prefect flow call the same `run`. No stage imports another stage.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from visionflow.core.config import Params
from visionflow.core.configfile import load_params
from visionflow.core.env import pause_gc, quiet_env, resume_gc
from visionflow.core.errors import VisionflowError
from visionflow.core.layout import Layout

# `python3 -m visionflow.stages.<name>` (what dvc.yaml runs): Python imports this package
# while it looks the stage module up (sys.argv[0] is "-m" until then), then runs the module,
# its heavy imports first. As `core.env.imports_without_gc` does, the cycle collector is
# paused for those imports, and `main` moves what they made out of its passes and turns it
# back on before any work.
_GC_PAUSED = sys.argv[:1] == ["-m"] and pause_gc()


def print_result(name: str, result: Any) -> None:
    """One line on stderr: the stage's result, its scalar fields (`outputs/` holds the rest),
    floats to four significant digits (rank 0 alone under torchrun)."""
    from rich.console import Console
    from rich.text import Text

    if os.environ.get("RANK", "0") != "0":
        return
    Console(stderr=True, soft_wrap=True).print(f"[bold green]{name}[/] done:",
                                               Text(result_line(name, result)))


def result_line(name: str, result: Any) -> str:
    """`key=value ...` of a stage result's scalar fields: numbers, short strings and paths
    (None, a field that does not apply, left out)."""
    payload = asdict(result) if is_dataclass(result) else result
    if name == "validate":
        payload = payload["summary"]
    if not isinstance(payload, dict):
        return str(payload)
    shown = []
    for key, value in payload.items():
        if isinstance(value, float):
            shown.append(f"{key}={value:.4g}")
        elif isinstance(value, bool | int | str | Path) and len(str(value)) <= 120:
            shown.append(f"{key}={value}")
    return " ".join(shown)


def main(name: str, run: Callable[[Params, Layout], Any], argv: list[str] | None = None) -> None:
    """`python3 -m visionflow.stages.<name> [-p params.yaml] [-s KEY=VALUE ...] [--root .]`"""
    resume_gc(_GC_PAUSED)
    ap = argparse.ArgumentParser(prog=f"python3 -m visionflow.stages.{name}",
                                 description=f"Run the {name} stage.")
    ap.add_argument("-p", "--params", default="params.yaml")
    ap.add_argument("-s", "--set", dest="overrides", action="append", default=[])
    ap.add_argument("--root", default=".")
    a = ap.parse_args(argv)
    quiet_env()
    try:
        layout = Layout.at(a.root)
        path = Path(a.params) if Path(a.params).is_absolute() else layout.root / a.params
        print_result(name, run(load_params(path, a.overrides, root=layout.root), layout))
    except VisionflowError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
