"""orchestration.stdio: a process whose stdout pipe loses its reader goes on and exits 0."""

from __future__ import annotations

import subprocess
import sys
import time

CHILD = """\
import sys, time
from visionflow.orchestration.stdio import outlive_the_reader
from rich.console import Console
relayed = outlive_the_reader(only_worker_runs=False)
print("relayed" if relayed else "direct", flush=True)
sys.stdin.readline()  # the parent closes our stdout's reader, then says go
console = Console()
for i in range(200):
    console.print(f"line {i}")
    print("x" * 1000, flush=True)
open(sys.argv[1], "w").write("finished")
"""


def _run(tmp_path, relay: bool) -> tuple[int, str]:
    done = tmp_path / f"done-{relay}"
    code = CHILD if relay else CHILD.replace("only_worker_runs=False", "fds=()")
    proc = subprocess.Popen([sys.executable, "-c", code, str(done)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.readline().decode().strip()
    proc.stdout.close()  # the worker dies: nobody reads the pipe any more
    time.sleep(0.2)
    proc.stdin.write(b"go\n")
    proc.stdin.close()
    rc = proc.wait(timeout=60)
    proc.stderr.close()
    return rc, first + (":" + done.read_text() if done.exists() else "")


def test_a_dead_reader_does_not_stop_the_process(tmp_path):
    assert _run(tmp_path, relay=True) == (0, "relayed:finished")


def test_without_the_relay_the_process_dies_on_the_closed_pipe(tmp_path):
    rc, seen = _run(tmp_path, relay=False)
    assert rc != 0 and seen == "direct"
