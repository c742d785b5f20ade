"""The Optuna study: its storage, sampler and pruner, and what survives a kill.

Storage: `VFLOW_TUNE_STORAGE` (an SQLAlchemy URL), else `tune.storage`, else the project's
sqlite file `.cache/tune/study.db`. A PostgreSQL URL (the team stack's server) lets `vflow
tune` on several hosts work on one study: each asks the storage for the next trial.

Resuming: a rerun opens the study by name (`load_if_exists`). Only COMPLETE and PRUNED trials
count towards `tune.trials`. A trial left RUNNING by a process that died is failed and its
parameters queued again: at once when that process ran on this host (its pid is gone), after
the heartbeat's grace period when it ran elsewhere.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from visionflow.core.config import Params
from visionflow.core.errors import ConfigError, one_line
from visionflow.core.layout import Layout
from visionflow.tune.space import baseline, changed_keys, fingerprint

STORAGE_ENV = "VFLOW_TUNE_STORAGE"
HEARTBEAT_S = 10  # a running trial's liveness record in the storage, this often
GRACE_S = 60  # ... and how long another host waits before it takes the trial over
WORKER_ATTR = "vflow_worker"
RUN_ATTR = "mlflow_run_id"
CREATOR_ATTR = "vflow_creator"  # the process that created the study (makes its MLflow parent)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
SCHEMA_LOCK = zlib.crc32(b"visionflow tune storage schema")  # a pg_advisory_lock key

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
# ask/tell with our own heartbeat thread (see `heartbeat`), not Study.optimize's
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
optuna.logging.set_verbosity(optuna.logging.WARNING)


def storage_url(params: Params, layout: Layout) -> str:
    url = os.environ.get(STORAGE_ENV) or params.tune.storage
    return url or f"sqlite:///{layout.tune_db}"


def is_local(url: str) -> bool:
    return url.startswith("sqlite:")


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    head, sep, tail = url.partition("@")
    if not sep or "://" not in head:
        return url
    scheme, _, user = head.partition("://")
    return f"{scheme}://{user.split(':', 1)[0]}:***@{tail}"


def open_storage(url: str) -> RDBStorage:
    """The study storage; its tables are created on first use. Hosts creating them at once
    (several `vflow tune` on a new database) would collide: on PostgreSQL the creation is
    serialised by an advisory lock (the others then find the tables made); two sqlite
    processes collide on a table or the schema version row, and the loser opens what the
    winner made."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = ({"connect_args": {"timeout": 60}} if is_local(url)
                              else {"pool_pre_ping": True})
    for attempt in range(3):
        try:
            with _schema_lock(url):
                return RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_S,
                                  grace_period=GRACE_S, heartbeat_stale_trial_callback=(
                                      RetryHeartbeatStaleTrialCallback(max_retry=2)))
        except Exception as err:  # noqa: BLE001 (a driver missing, a server down, a bad URL)
            if attempt == 2 or not _lost_schema_race(str(err)):
                raise ConfigError(f"tune storage {redact(url)}: {one_line(err)}") from None
            time.sleep(0.5)
    raise AssertionError("unreachable")  # the last attempt returns or raises


def _lost_schema_race(error: str) -> bool:
    """Another process created the same table, or the version row, first (a fresh sqlite
    file opened by two processes at once): opening again finds what it made."""
    return "alembic_version" in error or "already exists" in error


@contextlib.contextmanager
def _schema_lock(url: str) -> Iterator[None]:
    """PostgreSQL: hold a session advisory lock while Optuna creates its tables and types
    (concurrent CREATE TYPE/TABLE of one name fail with UniqueViolation, not wait)."""
    if not url.startswith("postgresql"):
        yield
        return
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": SCHEMA_LOCK})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"),
                             {"key": SCHEMA_LOCK})
                conn.commit()
    finally:
        engine.dispose()


def sampler(params: Params, offset: int) -> optuna.samplers.BaseSampler:
    """Seeded with `seed` plus `offset` (the trials already in the study), so that a resumed
    study draws new points instead of replaying the first run's."""
    cfg, seed = params.tune, params.seed + offset
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=cfg.startup_trials,
                                      constant_liar=cfg.parallel > 1)


def pruner(params: Params) -> optuna.pruners.BasePruner:
    cfg = params.tune
    if cfg.pruner == "none":
        return optuna.pruners.NopPruner()
    if cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=cfg.min_epochs, max_resource=max(params.train.epochs, cfg.min_epochs),
            reduction_factor=3)
    return optuna.pruners.MedianPruner(n_startup_trials=cfg.startup_trials,
                                       n_warmup_steps=cfg.min_epochs)


def open_study(params: Params, storage: RDBStorage, settings: dict[str, Any]) -> optuna.Study:
    """Create the study, or load it when it exists and was run with the same settings. Of
    several hosts starting at once, the one whose insert created the study records the
    settings and queues the baseline; the others wait for them."""
    name = params.tune.study
    try:
        storage.create_new_study([StudyDirection.MAXIMIZE], name)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        created = False
    sample_offset = len(storage.get_all_trials(storage.get_study_id_from_name(name),
                                               deepcopy=False))
    if not is_local(storage.url):
        sample_offset += zlib.crc32(worker_id().encode()) % 100_000  # hosts sample apart
    study = optuna.load_study(study_name=name, storage=storage,
                              sampler=sampler(params, sample_offset), pruner=pruner(params))
    if created:
        study.set_user_attr(CREATOR_ATTR, worker_id())
        study.set_user_attr("settings", settings)
        study.set_user_attr("fingerprint", fingerprint(settings))
        if params.tune.baseline and (start := baseline(params)):
            study.enqueue_trial(start, user_attrs={"baseline": True})
        return study
    known = _wait_for_settings(study)
    if known != settings:
        diff = changed_keys(known, settings)
        raise ConfigError(
            f"tune.study={name!r} was run with other settings ({', '.join(diff[:4])} changed):"
            f" name a new study (-s tune.study=NAME) or restore them")
    return study


def _wait_for_settings(study: optuna.Study, timeout: float = 30.0) -> dict[str, Any]:
    """The settings the study's creator records right after creating it (another host may
    be between the two)."""
    deadline = time.monotonic() + timeout
    while (known := study._storage.get_study_user_attrs(study._study_id).get("settings")) is None:
        if time.monotonic() > deadline:
            raise ConfigError(f"tune.study={study.study_name!r}: the study has no recorded "
                              "settings (its creator stopped at once): name a new study")
        time.sleep(0.2)
    return known


def existing(params: Params, layout: Layout) -> optuna.Study | None:
    """The study `tune.study` when its storage holds it (read-only use: no sampler state)."""
    storage = open_storage(storage_url(params, layout))
    try:
        return optuna.load_study(study_name=params.tune.study, storage=storage)
    except KeyError:
        return None


@dataclass(frozen=True)
class Counts:
    complete: int
    pruned: int
    running: int
    failed: int
    waiting: int

    @property
    def finished(self) -> int:
        return self.complete + self.pruned


def counts(study: optuna.Study) -> Counts:
    states = [t.state for t in study.get_trials(deepcopy=False)]
    return Counts(*(states.count(s) for s in (TrialState.COMPLETE, TrialState.PRUNED,
                                              TrialState.RUNNING, TrialState.FAIL,
                                              TrialState.WAITING)))


# --- liveness -------------------------------------------------------------------------------

def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (guards against pid reuse)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{_start_time(os.getpid())}"


def _dead_here(worker: str | None) -> bool:
    """The worker ran on this host and its process is gone."""
    if not worker or worker.count(":") < 2:
        return False
    host, pid, started = worker.rsplit(":", 2)
    if host != socket.gethostname() or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return started != str(_start_time(os.getpid()))
    alive = _start_time(int(pid))
    return alive is None or (started != "None" and alive != started)


def reclaim_stale(study: optuna.Study) -> list[FrozenTrial]:
    """Fail the RUNNING trials whose process died (this host: now; another host: after the
    heartbeat's grace period) and queue their parameters again; returns the failed trials."""
    storage = study._storage
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if _dead_here(t.user_attrs.get(WORKER_ATTR)):
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                if storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                    failed.append(storage.get_trial(t._trial_id))
                    RetryHeartbeatStaleTrialCallback(max_retry=2)(study, failed[-1])
    before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
    optuna.storages.fail_stale_trials(study)  # the heartbeat: trials of other hosts
    failed += [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
               if t.number not in before]
    return failed


@contextlib.contextmanager
def heartbeat(storage: RDBStorage, trial_id: int) -> Iterator[None]:
    """Record the trial's liveness every HEARTBEAT_S seconds while the body runs."""
    stop = threading.Event()

    def beat() -> None:
        while True:
            with contextlib.suppress(Exception):  # a missed beat is not an error
                storage.record_heartbeat(trial_id)
            if stop.wait(HEARTBEAT_S):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
