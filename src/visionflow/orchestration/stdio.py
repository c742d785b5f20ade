"""A flow run's console: it outlives its worker, and shows our own errors as one line.

A Prefect process worker reads its flow runs' stdout and stderr through pipes. When the worker
dies (SIGKILL, a host agent restarted) the flow-run process goes on, but its next write to the
closed pipe raises BrokenPipeError, and rich's console turns that into SystemExit: the run ends
Crashed half-way, its MLflow run left RUNNING. `outlive_the_reader` puts a relay between the
process (and its children, which inherit the descriptors) and those pipes: it forwards every
byte while the reader is there and drops the output once it is gone.

`user_errors_untraced` keeps Prefect's console from printing a traceback under a failed run's
line when the error is ours (the data gate, a bad value: the line names it); the run's log in
Prefect (API) keeps the traceback, and `vflow --debug` prints it.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import stat
import sys
import threading
from collections.abc import Iterator

from visionflow.core.errors import VisionflowError

FLOW_RUN_ENV = "PREFECT__FLOW_RUN_ID"  # set by Prefect's workers for the runs they start


def outlive_the_reader(fds: tuple[int, ...] = (1, 2), only_worker_runs: bool = True) -> bool:
    """Relay the pipe-backed `fds` through threads; True when at least one is relayed."""
    if only_worker_runs and not os.environ.get(FLOW_RUN_ENV):
        return False
    relays = []
    for fd in fds:
        try:
            if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                continue
        except OSError:
            continue
        original = os.dup(fd)
        read_end, write_end = os.pipe()
        os.dup2(write_end, fd)
        os.close(write_end)
        thread = threading.Thread(target=_relay, args=(read_end, original),
                                  name=f"stdio-relay-{fd}", daemon=True)
        thread.start()
        relays.append((fd, thread))
    if relays:
        atexit.register(_drain, relays)
    return bool(relays)


def _relay(read_end: int, out: int) -> None:
    reader_alive = True
    while chunk := os.read(read_end, 1 << 16):
        while reader_alive and chunk:
            try:
                chunk = chunk[os.write(out, chunk):]
            except OSError:  # EPIPE: the worker is gone; keep reading, drop the bytes
                reader_alive = False
    os.close(read_end)


def _drain(relays: list[tuple[int, threading.Thread]]) -> None:
    """At exit: flush, close our write ends, let the relays forward what is left."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd, _ in relays:
        os.dup2(devnull, fd)
    os.close(devnull)
    for _, thread in relays:
        thread.join(timeout=5)


class _Untraced(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], VisionflowError):
            record.exc_info = record.exc_text = None  # the API handler has already sent it
        return True


@contextlib.contextmanager
def user_errors_untraced() -> Iterator[None]:
    """While the body runs, Prefect's console handlers print our errors without traceback."""
    from prefect.logging.handlers import PrefectConsoleHandler

    handlers = [h for h in logging.getLogger().handlers if isinstance(h, PrefectConsoleHandler)]
    untraced = _Untraced()
    for handler in handlers:
        handler.addFilter(untraced)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(untraced)
