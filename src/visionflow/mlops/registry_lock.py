"""One registration at a time per registry, across every host that registers.

Registering reads the champion, scores it, creates a version and moves aliases; two of
those interleaved would both "beat" the same champion and leave `previous` and the alias
history wrong. Which lock:

- a **PostgreSQL advisory lock** when the registry is shared: in the database named by
  `VFLOW_REGISTRY_LOCK_URL` (the team stack hands out a role that may only connect), or in
  the tracking store itself when `MLFLOW_TRACKING_URI` is `postgresql://...`. Every host
  reaches that database already (it is the registry's), the lock is released by PostgreSQL
  the moment its holder's session ends (a crashed or SIGKILLed worker, a lost network), so a
  dead holder never blocks the team, and waiters queue in order;
- a **file lock** next to a local sqlite store (one machine), as before;
- a file lock with a warning for a tracking *server* without `VFLOW_REGISTRY_LOCK_URL`: it
  serialises this host only.

A lock whose session died while held (PostgreSQL restarted) is lost: `Held.check()`, called
right before aliases move, raises `RegistryLockLost`, a connection error, so the Prefect task
retries the registration from the start.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from visionflow.core.errors import VisionflowError

LOCK_URL_VAR = "VFLOW_REGISTRY_LOCK_URL"
# pg_advisory_lock(int4, int4): "vflw" and 1 = the registry. Constant, not derived from a URL:
# two hosts may name the same server differently.
ADVISORY_KEY = (0x76666C77, 1)
LOCK_TIMEOUT_S = 900
_warned: set[str] = set()


class RegistryLockError(VisionflowError):
    exit_code = 1


class RegistryLockLost(ConnectionError):
    """The lock's database session ended while it was held (transient: retry)."""


def endpoint(url: str) -> str:
    """`host:port/db` of a database URL, without the credentials (for messages)."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or 5432}{parts.path}"


def lock_url(tracking_uri: str) -> str | None:
    """The PostgreSQL database that holds the registry lock, or None (a file lock)."""
    url = os.environ.get(LOCK_URL_VAR, "").strip()
    if url:
        if urlsplit(url).scheme.split("+")[0] not in ("postgresql", "postgres"):
            raise RegistryLockError(f"{LOCK_URL_VAR}={endpoint(url)}: not a postgresql:// URL")
        return _plain(url)
    if urlsplit(tracking_uri).scheme.split("+")[0] in ("postgresql", "postgres"):
        return _plain(tracking_uri)
    return None


def _plain(url: str) -> str:
    """libpq takes `postgresql://`, not SQLAlchemy's `postgresql+driver://`."""
    scheme, rest = url.split("://", 1)
    return f"postgresql://{rest}" if scheme.startswith("postgres") else url


def lock_path(uri: str) -> Path:
    """The file lock of a local store: next to a sqlite file, else in the temp dir."""
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        return db.parent / f".{db.name}.register.lock"
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"visionflow-register-{digest}.lock"


class Held:
    """The held lock: `check()` before moving aliases."""

    kind = "file"

    def check(self) -> None:
        return None


class _Advisory(Held):
    kind = "postgresql"

    def __init__(self, conn: Any, where: str) -> None:
        self.conn, self.where = conn, where

    def check(self) -> None:
        try:
            with self.conn.cursor() as cur:
                cur.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND "
                            "pid = pg_backend_pid() AND classid = %s AND objid = %s AND "
                            "granted", ADVISORY_KEY)
                held = cur.fetchone()[0] > 0
        except Exception as err:  # noqa: BLE001 (any driver error: the session is gone)
            raise RegistryLockLost(f"registry lock at {self.where} lost: "
                                   f"{_first_line(err)}") from None
        if not held:
            raise RegistryLockLost(f"registry lock at {self.where} is no longer held")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _holder(conn: Any) -> str:
    with conn.cursor() as cur:
        cur.execute("SELECT a.application_name, a.client_addr FROM pg_locks l JOIN "
                    "pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND "
                    "l.classid = %s AND l.objid = %s AND l.granted", ADVISORY_KEY)
        row = cur.fetchone()
    return f"{row[0] or 'a client'} ({row[1] or 'local'})" if row else "another client"


@contextmanager
def advisory_lock(url: str, timeout: float = LOCK_TIMEOUT_S) -> Iterator[Held]:
    import psycopg

    where = endpoint(url)
    app = f"vflow-register {socket.gethostname()} pid {os.getpid()}"[:63]
    try:
        conn = psycopg.connect(url, autocommit=True, connect_timeout=10, application_name=app,
                               keepalives=1, keepalives_idle=10, keepalives_interval=5,
                               keepalives_count=3)
    except psycopg.OperationalError as err:
        raise ConnectionError(f"registry lock: PostgreSQL at {where} does not answer "
                              f"({_first_line(err)})") from None
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_try_advisory_lock(%s, %s)", ADVISORY_KEY)
            if not cur.fetchone()[0]:
                t0 = time.monotonic()
                print(f"registry lock at {where} held by {_holder(conn)}; waiting",
                      file=sys.stderr, flush=True)
                cur.execute(f"SET lock_timeout = {int(timeout * 1000)}")
                try:
                    cur.execute("SELECT pg_advisory_lock(%s, %s)", ADVISORY_KEY)
                except psycopg.errors.LockNotAvailable:
                    raise RegistryLockError(f"registry lock at {where} still held after "
                                            f"{timeout:.0f} s") from None
                print(f"registry lock at {where} acquired after "
                      f"{time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)
        yield _Advisory(conn, where)
    except psycopg.OperationalError as err:
        raise RegistryLockLost(f"registry lock at {where}: {_first_line(err)}") from None
    finally:
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_unlock_all()")
        except Exception:  # noqa: BLE001, S110 (a dead session has released it already)
            pass
        conn.close()


@contextmanager
def file_lock(uri: str, timeout: float = LOCK_TIMEOUT_S) -> Iterator[Held]:
    from filelock import FileLock, Timeout

    path = lock_path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(path), timeout=timeout):
            yield Held()
    except Timeout:
        raise RegistryLockError(f"{path}: registry lock still held after {timeout:.0f} s") \
            from None


@contextmanager
def registry_lock(uri: str, timeout: float = LOCK_TIMEOUT_S) -> Iterator[Held]:
    """Hold the registry's lock (see the module doc for which one)."""
    url = lock_url(uri)
    if url is not None:
        with advisory_lock(url, timeout) as held:
            yield held
        return
    if urlsplit(uri).scheme in ("http", "https") and uri not in _warned:
        _warned.add(uri)
        print(f"warning: MLFLOW_TRACKING_URI={uri} is a server, and {LOCK_URL_VAR} is not "
              "set: registrations are serialised on this host only", file=sys.stderr)
    with file_lock(uri, timeout) as held:
        yield held
