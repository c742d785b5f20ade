"""`engine.keep_freed_cpu_memory`: freed large blocks stay in the heap, so a CPU training
step reuses the last step's memory instead of faulting it in again page by page."""

from __future__ import annotations

import subprocess
import sys

from helpers import REPO

PAGES = 64 * 2**20 // 4096  # one 64 MiB tensor
SCRIPT = """
import resource, sys, torch
from visionflow.model import engine
if sys.argv[1] == "keep":
    assert engine.keep_freed_cpu_memory()
torch.empty(1).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):
    x = torch.empty(64 * 2**20 // 4).fill_(1.0)  # a step's activations, freed after it
    del x
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True,
                         check=True, cwd=REPO, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    return int(out.stdout.split()[-1])


def test_freed_blocks_are_reused_not_faulted_in_again():
    plain, kept = _faults("plain"), _faults("keep")
    assert plain > 30 * PAGES  # glibc's default: every allocation faults its pages in anew
    assert kept < 10 * PAGES, (plain, kept)
