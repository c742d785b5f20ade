"""A stage's start-up: its heavy imports run with the cycle collector paused, and the
collector is on again, with the imported objects frozen out of its passes, before the stage
does any work (`core.env.imports_without_gc`, `stages/__init__.py`; bench_stage_startup.py
measures what it saves)."""

from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path

from helpers import REPO

from visionflow.core.env import imports_without_gc

# as `python3 -m visionflow.stages.<name>` runs: the package imported while argv[0] is "-m",
# then the module's imports, then `main`, which runs the stage (here: a probe)
PROBE = """
import gc, sys
sys.argv = ["-m"]
import visionflow.stages as stages
paused_for_imports = not gc.isenabled()
import torch  # a stage module's imports
def probe(params, layout):
    print("work:", gc.isenabled(), gc.get_freeze_count() > 100_000, paused_for_imports)
stages.main("probe", probe, ["--root", ROOT])
"""


def test_a_stage_process_pauses_the_collector_for_its_imports_only(tmp_path: Path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    (tmp_path / "data" / "train").mkdir(parents=True)  # data.source must exist
    code = PROBE.replace("ROOT", repr(str(tmp_path)))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # on while the stage works; torch's objects frozen; off while they were imported
    assert "work: True True True" in proc.stdout, proc.stdout + proc.stderr[-2000:]


def test_imports_without_gc_restores_the_collector_as_it_was():
    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    with imports_without_gc():
        assert not gc.isenabled()
        kept = [[] for _ in range(10)]
    assert gc.isenabled() and gc.get_freeze_count() >= frozen + len(kept)
    gc.disable()
    try:
        with imports_without_gc():
            pass
        assert not gc.isenabled()  # a caller's own choice is left alone
    finally:
        gc.enable()
