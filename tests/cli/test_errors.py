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


def test_bad_config_fails_before_any_prefect_api_starts(tmp_path: Path):
    """`vflow run` with a bad override: the one line at once, no temporary API started (and
    no PREFECT_API_URL needed) first."""
    import os

    from builders import write_imagefolder
    from helpers import make_project

    root = make_project(tmp_path / "proj", write_imagefolder(tmp_path / "images", {"train/a": 2}),
                        mlflow_store=False)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    for bad, line in ((["-s", "nonsense"], "error: override: expected KEY=VALUE, got 'nonsense'"),
                      (["-s", "train.lr=abc"], f"error: {root}/params.yaml: train.lr='abc': ")):
        out = subprocess.run([str(BIN / "vflow"), "run", "--root", str(root), *bad], env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and out.stderr.startswith(line), out.stderr[-2000:]
        assert "temporary server" not in out.stdout + out.stderr, out.stderr[-2000:]


def test_a_failed_run_shows_our_error_without_prefects_traceback(tmp_path: Path,
                                                                 prefect_server: str):
    """Prefect logs a failed flow's exception with its traceback on the console; for our own
    errors the one line is the message (the traceback stays in the run's log in Prefect)."""
    import os

    from builders import write_imagefolder
    from helpers import make_project

    images = write_imagefolder(tmp_path / "images", {f"{s}/{c}": 10 for s in ("train", "test")
                                                     for c in "ab"})
    (images / "train" / "b" / "notes.png").write_text("not an image")
    root = make_project(tmp_path / "proj", images)
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    plain = subprocess.run([str(BIN / "vflow"), "run", "--root", str(root)], env=env,
                           capture_output=True, text=True, timeout=300)
    assert plain.returncode == 4, plain.stderr[-3000:]
    errors = [ln for ln in plain.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "train/b/notes.png" in errors[0], plain.stderr[-3000:]
    assert "ValidationFailed('data gate failed" in plain.stderr  # Prefect's line, untraced
    assert "Traceback" not in plain.stdout + plain.stderr

    debug = subprocess.run([str(BIN / "vflow"), "--debug", "run", "--root", str(root)],
                           env=env, capture_output=True, text=True, timeout=300)
    assert debug.returncode == 4 and "Traceback (most recent call last)" in debug.stderr
