"""Dataset versioning with DVC: materialise the default dataset and track `data/`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from visionflow.errors import DataError
from visionflow.layout import Layout


def dvc_bin() -> str:
    local = Path(sys.executable).with_name("dvc")
    return str(local) if local.exists() else (shutil.which("dvc") or "dvc")


def dvc(layout: Layout, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    from visionflow.tracking import quiet_env

    quiet_env()
    proc = subprocess.run([dvc_bin(), *args], cwd=layout.root, capture_output=True, text=True)
    if check and proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise DataError(f"dvc {' '.join(args)}: {msg[-1] if msg else 'failed'}")
    return proc


def ensure_dvc_repo(layout: Layout) -> None:
    if (layout.root / ".dvc").is_dir():
        return
    scm = (layout.root / ".git").exists()
    dvc(layout, "init", *([] if scm else ["--no-scm"]), "-q")


def init_default_data(layout: Layout, target: str = "data") -> Path:
    """Write the bundled digits dataset to `data/` if absent, and `dvc add` it."""
    from visionflow.digits import materialize_digits

    path = layout.root / target
    created = not path.is_dir() or not any(path.iterdir())
    if created:
        materialize_digits(path)
    ensure_dvc_repo(layout)
    dvc_file = layout.root / f"{target}.dvc"
    if created or not dvc_file.is_file() or _dvc_changed(layout, dvc_file):
        dvc(layout, "add", target, "-q")
    return path


def _dvc_changed(layout: Layout, dvc_file: Path) -> bool:
    proc = dvc(layout, "status", "--json", str(dvc_file.name), check=False)
    return proc.returncode != 0 or proc.stdout.strip() not in ("{}", "")
