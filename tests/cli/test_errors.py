"""Every CLI error is one line naming what is wrong, with a non-zero exit; `--debug` adds the
traceback before it."""

from __future__ import annotations

import subprocess
from pathlib import Path

from helpers import BIN


def _vflow(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "vflow"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_an_error_is_one_line_and_debug_adds_the_traceback(tmp_path: Path):
    missing = tmp_path / "nowhere"
    plain = _vflow("stage", "train", "--root", str(missing), cwd=tmp_path)
    assert plain.returncode == 2
    assert plain.stderr.strip().splitlines() == [
        f"error: {missing}/params.yaml: params file not found"]

    debug = _vflow("--debug", "stage", "train", "--root", str(missing), cwd=tmp_path)
    assert debug.returncode == 2
    lines = debug.stderr.strip().splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[-1] == plain.stderr.strip()
