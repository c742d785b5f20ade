"""Where a command's time goes, by function: a py-spy profile of it and every process it
starts (`--subprocesses`), read back as three tables: the share spent importing modules, by
kind of process; the library each sample's innermost frame is in (imports apart); and the
third-party calls that cost most, with the project or test frame that made them.

    pip install py-spy        # into any environment: a single binary
    py-spy record --subprocesses -r 20 -f raw -o suite.raw --nonblocking -- \\
        env VFLOW_REQUIRE_STACK=1 .venv/bin/python -m pytest -q -p no:cacheprovider -n 2
    .venv/bin/python bench/suite_profile.py suite.raw

py-spy counts a sample wherever a thread is not idle, so on a loaded machine a process that
waits for a core counts too: the figures are seconds on a core or waiting for one, not CPU
seconds. Processes shorter than py-spy's attach time are missed (its "Errors" count).
"""

from __future__ import annotations

import argparse
import collections
import re
from collections.abc import Iterator

IMPORT_FRAME = "_find_and_load"
PROCESS = "process "
# innermost match wins; a longer prefix before a shorter one of the same package
LIBRARIES = ("torch/onnx", "torch/_dynamo", "torch/export", "torch/fx", "torch/_functorch",
             "torch/nn", "torch/autograd", "torch/optim", "torch", "torchvision", "torchmetrics",
             "onnxruntime", "onnxscript", "onnx", "prefect", "mlflow", "dvc", "dvc_data",
             "dvc_objects", "great_expectations", "sqlalchemy", "aiosqlite", "matplotlib",
             "litdata", "optuna", "scipy", "numpy", "pandas", "PIL", "yaml", "ssl", "selectors",
             "asyncio", "threading", "httpx", "httpcore", "uvicorn", "starlette", "pydantic",
             "rich", "_pytest", "xdist", "visionflow")
OURS = ("visionflow/", "tests/", "helpers", "builders", "stack_fixtures", "projects", "bench/")


def samples(path: str) -> Iterator[tuple[str, list[str], int]]:
    """(the innermost process's command line, its frames outermost first, sample count)."""
    with open(path, errors="replace") as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not count.isdigit():
                continue  # a command line with a newline in it
            parts = stack.split(";")
            cut = max((i for i, p in enumerate(parts) if p.startswith(PROCESS)), default=-1)
            # a command line may hold ';' (python -c "a; b"): its pieces follow the marker
            while cut + 1 < len(parts) and "(" not in parts[cut + 1]:
                cut += 1
            head = ";".join(parts[:cut + 1])
            starts = list(re.finditer(r'process \d+:"', head))
            command = head[starts[-1].end():].rstrip('"') if starts else ""
            yield command, parts[cut + 1:], int(count)


def kind_of(command: str) -> str:
    c = command
    rules = (("prefect server", "prefect_compat server"), ("pytest worker", "-u -c import sys"),
             ("MLflow model server", "scoring_server"), ("MLflow server", "mlflow"),
             ("dvc", "bin/dvc"), ("torchrun", "torchrun"), ("Prefect flow run", "prefect.runner"),
             ("Prefect worker", "worker start"), ("prefect CLI", "bin/prefect"),
             ("GPU script dry run", "gpu_bench"), ("GPU script dry run", "airbench_run"),
             ("flows/retrain.py", "flows/retrain.py"), ("spawned child", "multiprocessing"),
             ("unknown (exited before py-spy read it)", ""))
    if m := re.search(r"visionflow\.stages\.(\w+)", c):
        return f"stage {m.group(1)}"
    if m := re.search(r"(?:bin/vflow|visionflow\.cli\.main)(?: --\S+)* (\w+)", c):
        return f"vflow {m.group(1)}"
    if not c:
        return rules[-1][0]
    return next((name for name, key in rules[:-1] if key in c), "other")


def path_of(frame: str) -> str:
    m = re.search(r"\(([^:)]+)", frame)
    return m.group(1) if m else frame


def library_of(frames: list[str]) -> str:
    for frame in reversed(frames):
        path = path_of(frame)
        for lib in LIBRARIES:
            if path.startswith(lib + "/") or path == lib + ".py":
                return lib
        if "/" in path and not path.startswith("<frozen"):
            return path.split("/")[0]
    return "?"


def caller(frames: list[str], lib: str) -> tuple[str, str] | None:
    """(the third-party function entered from our code, our frame) for a sample in `lib`."""
    for i in range(len(frames) - 1, 0, -1):
        if path_of(frames[i - 1]).startswith(OURS) and not path_of(frames[i]).startswith(OURS):
            return re.sub(r":\d+\)", ")", frames[i]), re.sub(r":\d+\)", ")", frames[i - 1])
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("raw", help="py-spy's -f raw output")
    ap.add_argument("--rate", type=float, default=20, help="py-spy's -r")
    ap.add_argument("--top", type=int, default=20)
    a = ap.parse_args()
    by_kind, imports_by_kind = collections.Counter(), collections.Counter()
    by_library, calls = collections.Counter(), collections.Counter()
    total = imported = 0
    for command, frames, n in samples(a.raw):
        kind = kind_of(command)
        total += n
        by_kind[kind] += n
        if any(IMPORT_FRAME in f for f in frames):
            imported += n
            imports_by_kind[kind] += n
            continue
        lib = library_of(frames)
        by_library[lib] += n
        if lib not in ("visionflow", "?") and (who := caller(frames, lib)):
            calls[(lib, *who)] += n
    s = a.rate
    print(f"{total / s:.0f} s sampled, {imported / s:.0f} s ({imported / total:.0%}) importing")
    print("\nby process kind: seconds, of which importing")
    for kind, n in by_kind.most_common(a.top):
        print(f"  {n / s:7.0f} {imports_by_kind[kind] / s:7.0f}  {kind}")
    print("\nby library of the innermost frame (imports apart)")
    for lib, n in by_library.most_common(a.top):
        print(f"  {n / s:7.0f}  {lib}")
    print("\ncostliest third-party calls: seconds, library, the call, the frame that made it")
    for (lib, call, frame), n in calls.most_common(a.top):
        print(f"  {n / s:7.1f}  {lib:14s} {call[:60]:60s} <- {frame[:60]}")


if __name__ == "__main__":
    main()
