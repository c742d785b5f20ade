"""What the Prefect flow (`flows/retrain.py`) decides, kept free of Prefect so it is testable.

- `is_transient`: which errors a stage task retries (I/O, a tracking server that does not
  answer) and which it never retries (the data gate, bad config, timeouts, code bugs).
- Stage cache keys: the same invalidation rules as `dvc repro`, read from `dvc.yaml` (the
  stage's params, its code files, the data source, and the keys of the stages it reads
  from), plus a marker per stage that proves its output files are still the ones that run
  wrote; a missing or changed output forces the stage to run again.
- The data-change trigger: refresh the data with DVC, work out the data version cheaply,
  and compare it with the registry (`data_hash`/`dvc_data_md5` tags).
- The late-run policy for scheduled runs.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from visionflow.config import Params
from visionflow.layout import Layout

MARKER = ".prefect-cache.json"

# ---------------------------------------------------------------------------------------
# retries

_PERMANENT_OS_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
                        NotADirectoryError)
_TRANSIENT_TEXT = re.compile(
    r"connection (refused|reset|aborted|error)|max retries exceeded|failed to establish a new "
    r"connection|timed? ?out|temporarily unavailable|service unavailable|bad gateway|"
    r"too many requests|database is locked|remote end closed|broken pipe|"
    r"\b(429|502|503|504)\b",
    re.IGNORECASE,
)
_MLFLOW_TRANSIENT_CODES = {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED",
                           "DEADLINE_EXCEEDED", "ABORTED"}


def is_transient(exc: BaseException | None) -> bool:
    """True for a failure worth retrying after a pause; False for one that would fail again.

    Never transient: any `VisionflowError` (`ValidationFailed`, `ConfigError`, `DataError`),
    a Prefect task/flow timeout, or a plain bug (ValueError, RuntimeError, ...). Transient:
    OSError other than missing/forbidden paths (includes ConnectionError, TimeoutError and
    requests' errors), urllib3 connection errors, an `MlflowException` or SQL error whose
    code or message says the server did not answer or the store was busy. The `__cause__`
    / `__context__` chain is searched, so a wrapped connection error counts.
    """
    from visionflow.errors import VisionflowError

    if exc is None or isinstance(exc, VisionflowError) or _is_prefect_timeout(exc):
        return False
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, VisionflowError):
            return False
        if _transient_one(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _transient_one(e: BaseException) -> bool:
    name, module = type(e).__name__, type(e).__module__
    if module.startswith("requests") and name == "HTTPError":
        status = getattr(getattr(e, "response", None), "status_code", None)
        return status is None or status >= 500 or status == 429
    if isinstance(e, OSError):  # not: a missing or forbidden path, a full/read-only disk
        return not (isinstance(e, _PERMANENT_OS_ERRORS) or e.errno in (errno.ENOSPC,
                                                                          errno.EROFS))
    if module.startswith("urllib3") and name in {
        "MaxRetryError", "NewConnectionError", "ProtocolError", "ReadTimeoutError",
        "ConnectTimeoutError", "ProxyError",
    }:
        return True
    if module.startswith("httpx") and ("Connect" in name or "Timeout" in name):
        return True
    if name == "MlflowException" or any(c.__name__ == "MlflowException"
                                         for c in type(e).__mro__):
        code = str(getattr(e, "error_code", "") or "")
        try:
            status = int(e.get_http_status_code())  # type: ignore[attr-defined]
        except (AttributeError, TypeError, ValueError):
            status = 0
        return (code in _MLFLOW_TRANSIENT_CODES or status in (429, 502, 503, 504)
                or bool(_TRANSIENT_TEXT.search(str(e))))
    if module.startswith("sqlalchemy") and name in {"OperationalError", "TimeoutError",
                                                    "DisconnectionError"}:
        return bool(_TRANSIENT_TEXT.search(str(e))) or name != "OperationalError"
    return False


def _is_prefect_timeout(exc: BaseException) -> bool:
    return type(exc).__module__.startswith("prefect") and "Timeout" in type(exc).__name__


def retry_delays(first_s: float, retries: int) -> list[float]:
    """Exponential back-off: first, 2x, 4x, ..."""
    return [first_s * 2**i for i in range(retries)]


# ---------------------------------------------------------------------------------------
# stage cache keys (mirroring dvc.yaml)


@dataclass(frozen=True)
class StageSpec:
    """What a stage depends on and writes, as `dvc.yaml` declares it."""

    name: str
    params: tuple[str, ...]
    code: tuple[str, ...]
    data: bool
    upstream: tuple[str, ...]
    outs: tuple[str, ...]


def _paths(entries: Iterable[Any]) -> list[str]:
    out: list[str] = []
    for e in entries or []:
        if isinstance(e, str):
            out.append(e)
        elif isinstance(e, dict):
            out.extend(str(k) for k in e)
    return out


def _param_names(entries: Iterable[Any]) -> list[str]:
    out: list[str] = []
    for e in entries or []:
        if isinstance(e, str):
            out.append(e)
        elif isinstance(e, dict):  # {params.yaml: [a, b]} or {a: ...}
            for k, v in e.items():
                out.extend(_param_names(v) if isinstance(v, list) else [str(k)])
    return out


def read_specs(layout: Layout, stages: Iterable[str]) -> dict[str, StageSpec] | None:
    """Parse `dvc.yaml`; None if it is missing or unreadable (then nothing is cached)."""
    import yaml

    path = layout.dvc_yaml
    try:
        raw = (yaml.safe_load(path.read_text()) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError):
        return None
    stages = list(stages)
    if not all(s in raw for s in stages):
        return None
    outs = {s: _paths(raw[s].get("outs")) + _paths(raw[s].get("metrics"))
            + _paths(raw[s].get("plots")) for s in stages}

    def producer(dep: str) -> str | None:
        for s, paths in outs.items():
            if any(dep == p or dep.startswith(p.rstrip("/") + "/") for p in paths):
                return s
        return None

    specs = {}
    for s in stages:
        code, upstream, data = [], [], False
        for dep in _paths(raw[s].get("deps")):
            if "${" in dep:
                data = True
            elif (up := producer(dep)) is not None:
                upstream.append(up)
            else:
                code.append(dep)
        specs[s] = StageSpec(s, tuple(_param_names(raw[s].get("params"))), tuple(code), data,
                             tuple(dict.fromkeys(upstream)), tuple(outs[s]))
    return specs


def _code_path(layout: Layout, dep: str) -> Path:
    """`src/visionflow/x.py` is the code that actually runs: the imported package's file."""
    import visionflow

    parts = Path(dep).parts
    if len(parts) >= 2 and parts[:2] == ("src", "visionflow"):
        return Path(visionflow.__file__).parent.joinpath(*parts[2:])
    return layout.root / dep


def _walk(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        return []
    out = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        out.extend(Path(dirpath) / f for f in sorted(filenames) if not f.endswith(".pyc"))
    return out


def code_digest(layout: Layout, deps: Iterable[str]) -> str:
    h = hashlib.sha256()
    for dep in sorted(deps):
        path = _code_path(layout, dep)
        h.update(f"{dep}\0".encode())
        for f in _walk(path):
            h.update(f"{f.relative_to(path) if f != path else ''}\0".encode())
            h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def source_path(params: Params, layout: Layout, fetch: bool = False) -> Path:
    """The data source on disk. A `torchvision:` dataset: the folder it is written to,
    downloaded and written first when `fetch`."""
    from visionflow.data import torchvision_source

    if torchvision_source.is_torchvision_source(params.data.source):
        how = torchvision_source.materialize if fetch else torchvision_source.folder
        return how(params.data.source, layout.cache_root)
    return layout.root / params.data.source  # (an absolute source replaces the root)


def stat_stamp(path: Path) -> str:
    """Paths, sizes and mtimes of every file under `path` (one stat per file: cheap).

    The same change test DVC uses for its state cache: touching or replacing a file
    changes the stamp; the data is only re-read when it does."""
    h = hashlib.sha256()
    for f in _walk(path):
        st = f.stat()
        rel = f.relative_to(path) if f != path else Path(f.name)
        h.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _lookup(d: dict[str, Any], dotted: str) -> Any:
    node: Any = d
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def stage_keys(specs: dict[str, StageSpec] | None, params: Params, layout: Layout,
               skip: Iterable[str] = ()) -> dict[str, str | None]:
    """One cache key per stage: its params, code, data (validate) and upstream keys."""
    if specs is None:
        return {}
    from visionflow.mlops.tracking import tracking_uri

    dump = params.dump()
    where = {"root": str(layout.root), "tracking": tracking_uri(layout)}
    keys: dict[str, str | None] = {}
    data_stamp: str | None = None
    for name, spec in specs.items():
        if name in skip or any(keys.get(u) is None for u in spec.upstream):
            keys[name] = None
            continue
        if spec.data and data_stamp is None:
            data_stamp = stat_stamp(source_path(params, layout))
        payload = {
            "stage": name,
            "where": where,  # a project's results are never another project's
            "params": {p: _lookup(dump, p) for p in spec.params},
            "code": code_digest(layout, spec.code),
            "data": data_stamp if spec.data else None,
            "source": params.data.source if spec.data else None,
            "upstream": {u: keys[u] for u in spec.upstream},
        }
        keys[name] = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return keys


def outs_signature(layout: Layout, outs: Iterable[str]) -> dict[str, Any]:
    """Size and mtime of each output file (a directory: a stamp of its files); None if absent."""
    sig: dict[str, Any] = {}
    for out in outs:
        path = layout.root / out
        if path.is_file():
            st = path.stat()
            sig[out] = [st.st_size, st.st_mtime_ns]
        elif path.is_dir():
            sig[out] = stat_stamp(path)
        else:
            sig[out] = None
    return sig


def marker_path(layout: Layout, stage: str) -> Path:
    return layout.outputs / stage / MARKER


def write_marker(layout: Layout, spec: StageSpec, key: str) -> None:
    from visionflow.files import write_json

    write_json(marker_path(layout, spec.name),
               {"key": key, "outs": outs_signature(layout, spec.outs)})


def clear_marker(layout: Layout, stage: str) -> None:
    marker_path(layout, stage).unlink(missing_ok=True)


def outputs_match(layout: Layout, spec: StageSpec, key: str) -> bool:
    """True when the stage's outputs are exactly what the run with this key wrote."""
    try:
        m = json.loads(marker_path(layout, spec.name).read_text())
    except (OSError, ValueError):
        return False
    sig = outs_signature(layout, spec.outs)
    return m.get("key") == key and m.get("outs") == sig and all(v is not None
                                                                 for v in sig.values())


# ---------------------------------------------------------------------------------------
# data-change trigger


@dataclass
class DataCheck:
    """Whether this run has new data to train on, and why."""

    new_data: bool | None  # None: undecided until validate has computed the data hash
    reason: str
    data_hash: str = ""
    dvc_md5: str = ""
    method: str = ""
    champion: dict[str, str] = field(default_factory=dict)
    latest: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def dvc_tracked(params: Params, layout: Layout) -> Path | None:
    """The `.dvc` file tracking the data source, if it is a DVC-tracked path in the repo."""
    src = source_path(params, layout).resolve()
    try:
        src.relative_to(layout.root)
    except ValueError:
        return None
    dvc_file = src.with_name(src.name + ".dvc")
    return dvc_file if dvc_file.is_file() else None


def refresh_data(params: Params, layout: Layout) -> str:
    """`dvc update` (an import) or `dvc pull` (a remote is configured) of the data source.

    Tolerates "nothing to pull" and, with a warning in the message, a refresh that fails
    while local data exists (the data check below then works on what is there)."""
    import yaml

    from visionflow.data.dvc import dvc

    dvc_file = dvc_tracked(params, layout)
    if dvc_file is None:
        return f"{params.data.source}: not tracked by DVC, used as it is"
    rel = str(dvc_file.relative_to(layout.root))
    meta = yaml.safe_load(dvc_file.read_text()) or {}
    is_import = any(isinstance(d, dict) and d.get("repo") for d in meta.get("deps") or [])
    if is_import:
        args = ["update", rel]
    else:
        remotes = dvc(layout, "remote", "list", check=False).stdout.strip()
        if not remotes:
            return f"{rel}: no DVC remote configured, local data used"
        args = ["pull", rel]
    proc = dvc(layout, *args, check=False)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    last = lines[-1] if lines else "done"
    if proc.returncode != 0:
        from visionflow.errors import DataError

        if not source_path(params, layout).exists():
            raise DataError(f"dvc {' '.join(args)}: {last}")
        return f"dvc {' '.join(args)} failed ({last}); local data used"
    return f"dvc {' '.join(args)}: {last}"


def dvc_clean(layout: Layout, dvc_file: Path) -> bool:
    """True when the workspace data matches what the .dvc file records."""
    from visionflow.data.dvc import dvc

    proc = dvc(layout, "status", "--json", str(dvc_file.relative_to(layout.root)), check=False)
    return proc.returncode == 0 and proc.stdout.strip() in ("{}", "")


def registry_versions(params: Params, layout: Layout) -> tuple[dict[str, str], dict[str, str]]:
    """Tags (plus `version`) of the current champion and of the latest version ({} if none)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from visionflow.mlops import tracking

    tracking.setup(layout)
    client = MlflowClient()
    cfg = params.register_
    champion: dict[str, str] = {}
    try:
        mv = client.get_model_version_by_alias(cfg.model_name, cfg.alias)
        champion = {**mv.tags, "version": str(mv.version)}
    except MlflowException:
        pass
    latest: dict[str, str] = {}
    try:
        versions = client.search_model_versions(f"name='{cfg.model_name}'")
    except MlflowException:
        versions = []
    versions = [v for v in versions if "parent_version" not in (v.tags or {})]  # not `compact`
    if versions:
        mv = max(versions, key=lambda v: int(v.version))
        latest = {**mv.tags, "version": str(mv.version)}
    return champion, latest


def _source_of(tags: dict[str, str]) -> str | None:
    try:
        return json.loads(tags.get("params", ""))["data"]["source"]
    except (ValueError, KeyError, TypeError):
        return None


def compare_data(data_hash: str, champion: dict[str, str], latest: dict[str, str],
                 method: str, dvc_md5: str = "") -> DataCheck:
    """New data unless the champion, or the latest version (rejected by the gate), was
    trained on this data version already."""
    short = data_hash[:12]
    if not champion:
        return DataCheck(True, "no champion yet", data_hash, dvc_md5, method, champion, latest)
    if champion.get("data_hash") == data_hash:
        return DataCheck(False, f"no new data: champion v{champion['version']} was trained on "
                         f"data {short}", data_hash, dvc_md5, method, champion, latest)
    if latest and latest.get("data_hash") == data_hash:
        return DataCheck(False, f"no new data: v{latest['version']} was trained on data {short} "
                         f"and {latest.get('gate_decision', 'registered')} "
                         f"({latest.get('gate_reason', '')}); force to retrain",
                         data_hash, dvc_md5, method, champion, latest)
    return DataCheck(True, f"new data: {short} (champion v{champion['version']} was trained "
                     f"on {champion.get('data_hash', '?')[:12]})", data_hash, dvc_md5, method,
                     champion, latest)


def check_data(params: Params, layout: Layout, validate_key: str | None,
               validate_spec: StageSpec | None) -> DataCheck:
    """Decide "new data?" as cheaply as possible, cheapest first:

    1. the source is DVC-tracked, `dvc status` says the workspace matches the `.dvc` file,
       and its md5 is the `dvc_data_md5` of the champion (trained from the same
       `data.source`): same data, nothing hashed;
    2. the validate outputs on disk were written for this very source stamp, params and
       code (its cache marker): their `data_hash` is the current one;
    3. otherwise undecided (`new_data=None`): validate runs (it is the first stage anyway)
       and the flow compares the data hash it computes.
    """
    from visionflow.stages.register import dvc_md5

    champion, latest = registry_versions(params, layout)
    md5 = ""
    dvc_file = dvc_tracked(params, layout)
    if dvc_file is not None:
        md5 = dvc_md5(dvc_file)
    if not champion:
        return DataCheck(True, "no champion yet", "", md5, "registry", champion, latest)
    if md5 and dvc_file is not None:
        same_md5 = [t for t in (champion, latest) if t and t.get("dvc_data_md5") == md5
                    and _source_of(t) == params.data.source]
        if same_md5 and dvc_clean(layout, dvc_file):
            t = same_md5[0]
            return compare_data(t.get("data_hash", ""), champion, latest, "dvc md5", md5)
    if validate_key and validate_spec and outputs_match(layout, validate_spec, validate_key):
        summary = json.loads(layout.validation.read_text())
        if summary.get("success") and summary.get("data_hash"):
            return compare_data(summary["data_hash"], champion, latest, "validate outputs", md5)
    return DataCheck(None, "data version unknown until validate hashes it", "", md5,
                     "validate", champion, latest)


# ---------------------------------------------------------------------------------------
# late runs


def late_reason(expected_start: datetime | None, now: datetime, max_lateness_s: float | None,
                auto_scheduled: bool) -> str | None:
    """A scheduled run that starts more than `max_lateness_s` after its slot is skipped.

    Runs queue behind a slow one (concurrency limit 1, ENQUEUE) instead of overlapping it;
    this drops the ones that waited too long, so a backlog never replays stale slots.
    Manual and forced runs are never skipped as late."""
    if not auto_scheduled or expected_start is None or not max_lateness_s:
        return None
    late = (now - expected_start).total_seconds()
    if late <= max_lateness_s:
        return None
    return (f"late: scheduled for {expected_start.isoformat(timespec='seconds')}, started "
            f"{late:.0f} s later (flow.schedule.max_lateness_s={max_lateness_s:g}); "
            "the next scheduled run takes over")
