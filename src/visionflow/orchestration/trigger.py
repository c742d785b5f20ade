"""Retraining when the data changes: refresh the data with DVC, decide "new data?" as
cheaply as possible against the registry's champion (and the latest version), `vflow data
status`, and the late-run policy for scheduled runs."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from visionflow.core.config import Params
from visionflow.core.errors import DataError
from visionflow.core.files import read_json
from visionflow.core.layout import Layout
from visionflow.data import manifest, survey
from visionflow.data.add import import_url
from visionflow.data.dvc import (
    changed,
    dvc,
    dvc_md5,
    dvc_origin,
    dvc_out,
    error_line,
    push_version,
    relative,
    remotes,
    workspace_state,
)
from visionflow.data.source import dvc_tracked, source_path
from visionflow.mlops.lineage import champion_and_latest, champion_tags, champion_version
from visionflow.mlops.registry import client_for, version_metrics


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


def data_version(params: Params, layout: Layout) -> dict[str, str]:
    """What every run's summary shows about the data before anything runs: the md5
    `data.dvc` records (or why there is none)."""
    try:
        dvc_file = dvc_tracked(params, layout)
    except Exception:  # noqa: BLE001 (a summary line, never a failure)
        dvc_file = None
    if dvc_file is None:
        return {"dvc_md5": "", "dvc_note": f"{params.data.source} is not DVC-tracked"}
    return {"dvc_md5": dvc_md5(dvc_file), "dvc_file": dvc_file.name}


def data_news(params: Params, layout: Layout, data_hash: str) -> str:
    """"new data?" for a run that trains regardless (a manual run): the same comparison a
    scheduled run makes, for the summary."""
    try:
        champion, latest = champion_and_latest(params, layout)
    except Exception as err:  # noqa: BLE001 (a summary line, never a failure)
        return f"unknown (registry: {' '.join(str(err).split())[:120]})"
    return compare_data(data_hash, champion, latest, "validate").reason


def champion_metrics(params: Params, layout: Layout, alias: str | None = None
                     ) -> dict[str, Any]:
    """The version holding `alias` (the champion by default) and its test metrics now ({}
    when none or no registry)."""
    try:
        _, mv = champion_version(layout, params.register_.model_name,
                                 alias or params.register_.alias)
        if mv is None:
            return {}
        return {"version": str(mv.version),
                "metrics": version_metrics(mv, client_for(layout))}
    except Exception:  # noqa: BLE001 (a comparison in a report, never a failure)
        return {}


def refresh_data(params: Params, layout: Layout) -> str:
    """The data source brought up to date: an S3 prefix synced again (`vflow data add
    s3://...`), `dvc update` of an import (`dvc import`, `dvc import-url`), or `dvc pull`
    (a remote is configured).

    Tolerates "nothing to pull" and, with a warning in the message, a refresh that fails
    while local data exists (the data check below then works on what is there)."""
    dvc_file = dvc_tracked(params, layout)
    if dvc_file is None:
        return f"{params.data.source}: not tracked by DVC, used as it is"
    rel = relative(layout, dvc_file)
    before = dvc_out(dvc_file)
    if mirrored := (before.get("meta") or {}).get("source"):  # `vflow data add s3://...`
        return _sync(params, layout, dvc_file, str(mirrored))
    origin = dvc_origin(dvc_file)
    if origin:  # `dvc import` of a DVC repo, `dvc import-url`
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
        last = error_line(proc.stdout + proc.stderr)
        if not source_path(params, layout).exists():
            raise DataError(f"dvc {' '.join(args)}: {last}")
        return f"dvc {' '.join(args)} failed ({last}); local data used"
    if origin:
        after = dvc_out(dvc_file)
        if after.get("md5") == before.get("md5"):
            return f"dvc update {rel}: {origin} unchanged"
        return (f"dvc update {rel}: {origin}: {before.get('nfiles', '?')} -> "
                f"{after.get('nfiles', '?')} files (md5 {after.get('md5', '')})")
    return f"dvc {' '.join(args)}: {last}"


def _sync(params: Params, layout: Layout, dvc_file: Path, url: str) -> str:
    """The S3 prefix synced again (new or changed objects downloaded, then `dvc add`); a
    failure with local data there: the data check goes on with it."""
    target = relative(layout, dvc_file).removesuffix(".dvc")  # data/, or deeper
    try:
        out = import_url(layout, url, target, force=True)
    except DataError as err:
        if not source_path(params, layout).exists():
            raise
        return f"{url}: sync failed ({err}); local data used"
    s = out["sync"]
    new = s["downloaded"] + s["resumed"]  # (resumed: downloaded by a try that stopped)
    if not (new or s["removed"]):
        return f"{url}: unchanged ({s['listed']} objects)"
    # pushed: the bucket can change again, and the model trained now names this version
    return (f"{url}: {new} new or changed, {s['removed']} removed, {s['kept']} unchanged "
            f"({out['dvc_file']} md5 {out['dvc_data_md5']}; {push_version(layout, dvc_file)})")


def _source_of(tags: dict[str, str]) -> str | None:
    if tags.get("data_source"):
        return tags["data_source"]
    try:  # older versions: the params as JSON
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


def check_data(params: Params, layout: Layout, validate_fresh: bool) -> DataCheck:
    """Decide "new data?" as cheaply as possible, cheapest first:

    1. the source is DVC-tracked, `dvc status` says the workspace matches the `.dvc` file,
       and its md5 is the `dvc_data_md5` of the champion (trained from the same
       `data.source`): same data, nothing hashed;
    2. validate is up to date per `dvc.lock` (`validate_fresh`): the `data_hash` of its
       outputs on disk is the current one;
    3. otherwise undecided (`new_data=None`): validate runs (it is the first stage anyway)
       and the flow compares the data hash it computes.
    """
    champion, latest = champion_and_latest(params, layout)
    md5 = ""
    dvc_file = dvc_tracked(params, layout)
    if dvc_file is not None:
        md5 = dvc_md5(dvc_file)
    if not champion:
        return DataCheck(True, "no champion yet", "", md5, "registry", champion, latest)
    if md5 and dvc_file is not None:
        same_md5 = [t for t in (champion, latest) if t and t.get("dvc_data_md5") == md5
                    and _source_of(t) == params.data.source]
        if same_md5 and not changed(layout, dvc_file):
            t = same_md5[0]
            return compare_data(t.get("data_hash", ""), champion, latest, "dvc md5", md5)
    if validate_fresh:
        summary = read_json(layout.validation, {}) or {}
        if summary.get("success") and summary.get("data_hash"):
            return compare_data(summary["data_hash"], champion, latest, "validate outputs", md5)
    return DataCheck(None, "data version unknown until validate hashes it", "", md5,
                     "validate", champion, latest)


def data_status(layout: Layout, params: Any, target: str = "data",
                compute_hash: bool = True) -> dict[str, Any]:
    """The current data version next to the champion's (see `vflow data status`)."""
    dvc_file = layout.dvc_file(target)
    out = dvc_out(dvc_file)
    current: dict[str, Any] = {
        "source": params.data.source,
        "dvc_file": dvc_file.name if dvc_file.is_file() else "",
        "imported_from": dvc_origin(dvc_file),
        "dvc_data_md5": str(out.get("md5", "")),
        "nfiles": out.get("nfiles"), "size": out.get("size"),
        "workspace": workspace_state(layout, target) if layout.dvc_dir.is_dir()
        else "no DVC repo",
        "data_hash": "",
    }
    if compute_hash:
        _, rows, _ = survey.build_manifest(params, layout)
        current["data_hash"] = manifest.data_hash(rows)
    v = read_json(layout.validation)
    validated = ({"data_hash": v.get("data_hash", ""), "success": v.get("success")}
                 if isinstance(v, dict) else {})
    reg = params.register_
    champ = champion_tags(layout, reg.model_name, reg.alias)
    name, urls = remotes(layout)
    same = None
    if champ.get("status") == "ok":
        def md5(v: str) -> str:  # "<md5>.dir" in .dvc files; tags may drop the suffix
            return v.removesuffix(".dir")

        pairs = [(current["data_hash"], champ["data_hash"]),
                 (md5(current["dvc_data_md5"]), md5(champ["dvc_data_md5"]))]
        known = [a == b for a, b in pairs if a and b]
        same = all(known) if known else None
    return {"current": current, "last_validated": validated, "champion": champ,
            "same_as_champion": same,
            "remote": {"name": name or "", "url": urls.get(name or "", "")}}


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
