"""Where a command's CPU goes, by process: every process's own user + sys time, read from
/proc once a second while the command runs (killed processes included, up to their last
sample), grouped by what they run; and the machine's idle share.

    .venv/bin/python bench/suite_census.py -- env VFLOW_REQUIRE_STACK=1 \\
        .venv/bin/python -m pytest -q -p no:cacheprovider -n 2
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import time
from pathlib import Path

HZ = os.sysconf("SC_CLK_TCK")
TOOLS = ("vflow", "dvc", "prefect")


def cpu_of(pid: str) -> tuple[str, float] | None:
    """(start tick, own CPU seconds) of a process, None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[19], (int(fields[11]) + int(fields[12])) / HZ


def group(cmd: str) -> str:
    """What a process runs: `py -m module`, `vflow tune`, `postgres`, ..."""
    args = cmd.split()
    if not args:
        return "?"
    name = args[0].rsplit("/", 1)[-1]
    if name.startswith("python") and len(args) > 1:
        if args[1] == "-m" and len(args) > 2:
            return f"py -m {args[2]}"
        name = "py -c" if args[1].startswith("-") else args[1].rsplit("/", 1)[-1]
    if name in TOOLS and len(args) > 1:
        name += " " + args[1]
    return name.split(":")[0]


def idle_total() -> tuple[int, int]:
    ticks = list(map(int, Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]))
    return ticks[3] + ticks[4], sum(ticks)


def main() -> None:
    command = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else sys.argv[1:]
    before = {p: cpu_of(p) for p in os.listdir("/proc") if p.isdigit()}
    seen: dict[tuple[str, str], list] = {}  # (pid, start) -> [group, cpu]
    idle0, total0 = idle_total()
    t0 = time.time()
    proc = subprocess.Popen(command)
    while proc.poll() is None:
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or (now := cpu_of(pid)) is None:
                continue
            if before.get(pid) is not None and before[pid][0] == now[0]:
                continue  # running before the command started
            key = (pid, now[0])
            if key not in seen:
                try:
                    raw = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                seen[key] = [group(raw.replace(b"\0", b" ").decode(errors="replace")), 0.0]
            seen[key][1] = now[1]
        time.sleep(1.0)
    idle1, total1 = idle_total()
    by = collections.defaultdict(lambda: [0.0, 0])
    for name, cpu in seen.values():
        by[name][0] += cpu
        by[name][1] += 1
    wall = time.time() - t0
    used = sum(v[0] for v in by.values())
    idle = 100 * (idle1 - idle0) / max(1, total1 - total0)
    print(f"\n{wall:.0f} s, exit {proc.returncode}; its processes {used:.0f} CPU-s; "
          f"cores idle {idle:.1f}%")
    for name, (cpu, n) in sorted(by.items(), key=lambda kv: -kv[1][0])[:30]:
        print(f"{cpu:8.1f} {n:4d}  {name}")
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
