"""What the registry knows about the data its models were trained on: the champion (and the
latest version), their data tags and data summary. mlflow is imported only when a registry
can exist (the project's sqlite file, or MLFLOW_TRACKING_URI), so a first run stays light."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from visionflow.core.config import Params
from visionflow.core.layout import Layout
from visionflow.data.splits import compare_schemes, describe_scheme
from visionflow.mlops.provenance import LINEAGE_KEYS, lineage
from visionflow.mlops.registry import RegistryError, champion_of, client_for, resolve

SUMMARY_ARTIFACTS = ("data/data_summary.json", "data/validation.json")  # as train logs them


def registry_uri_if_any(layout: Layout) -> str | None:
    """The tracking URI when a registry can exist, else None (and mlflow stays unimported)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    db = layout.mlflow_db
    return f"sqlite:///{db}" if db.is_file() else None


def champion_version(layout: Layout, model_name: str, alias: str) -> tuple[str | None, Any]:
    """(tracking uri, the model version holding `alias`). The uri is None when no registry
    can exist (and mlflow is not imported); the version is None when the alias is unset."""
    uri = registry_uri_if_any(layout)
    if uri is None:
        return None, None
    return uri, champion_of(client_for(layout), model_name, alias)


def champion_summary(layout: Layout, model_name: str, alias: str = "champion"
                     ) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(the champion's data summary or None, where it came from / why there is none)."""
    info: dict[str, Any] = {"model": model_name, "alias": alias}
    try:
        uri, mv = champion_version(layout, model_name, alias)
        if uri is None:
            return None, {**info, "status": "no_registry"}
        if mv is None:
            return None, {**info, "status": "no_champion"}
        import mlflow  # imported only once a registry exists

        info.update(version=str(mv.version), run_id=mv.run_id)
        if not mv.run_id:
            return None, {**info, "status": "champion has no run"}
        with tempfile.TemporaryDirectory() as tmp:
            for art in SUMMARY_ARTIFACTS:
                try:
                    local = mlflow.artifacts.download_artifacts(
                        run_id=mv.run_id, artifact_path=art, dst_path=tmp, tracking_uri=uri)
                    blob = json.loads(Path(local).read_text())
                except Exception:  # absent artifact: try the next place
                    continue
                summary = blob if art.endswith("data_summary.json") else blob.get("data_summary")
                if isinstance(summary, dict) and summary.get("classes") is not None:
                    return summary, {**info, "status": "ok", "artifact": art}
        return None, {**info, "status": "champion run has no data summary"}
    except Exception as e:  # drift is advisory: a lookup error never crashes the gate
        msg = " ".join(str(e).split())[:200] or type(e).__name__
        return None, {**info, "status": "unavailable", "error": msg}


def no_summary_reason(info: dict[str, Any]) -> str:
    """`champion_summary`'s reason for having no summary, in words."""
    status, model = info.get("status"), f"{info.get('model')}@{info.get('alias')}"
    return {"no_registry": "no model registry here yet: the first registered model becomes it",
            "no_champion": f"no {model} yet",
            "unavailable": f"the registry did not answer: {info.get('error')}"
            }.get(status, f"{model} v{info.get('version')}: {status}")


def trained_hashes(mv: Any) -> tuple[set[str] | None, str]:
    """(the sha256 of the images version `mv` trained or validated on, "recorded"), or
    (None, why they are unknown). A `compact` version points at its parent's."""
    import mlflow

    uri = lineage(mv.tags, "train_hashes")
    if not uri:
        return None, (f"champion v{mv.version} records no training-image hashes (registered "
                      "before they were recorded): its training images could not be excluded")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            blob = json.loads(Path(mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=tmp)).read_text())
        return set(blob["train"]) | set(blob["val"]), "recorded"
    except Exception as e:  # artifacts gone or unreadable: reported, never a crash
        return None, (f"champion v{mv.version}'s training-image hashes cannot be read "
                      f"({type(e).__name__}): its training images could not be excluded")


def champion_split_scheme(layout: Layout, model_name: str, alias: str = "champion"
                          ) -> tuple[dict[str, Any] | None, str]:
    """(the split scheme the champion's data was split with, or None; who/why): from its
    `split_scheme` tag, without importing mlflow when no registry can exist."""
    try:
        uri, mv = champion_version(layout, model_name, alias)
        if uri is None or mv is None:
            return None, "no champion yet"
        who = f"champion v{mv.version}"
        tags = mv.tags or {}
        if fingerprint := lineage(tags, "split_fingerprint"):
            return {"fingerprint": fingerprint,
                    "description": lineage(tags, "split_scheme")}, who
        raw = tags.get("split_scheme")  # older versions: the scheme as JSON
        if not raw:
            return None, f"{who} records no split scheme"
        scheme = json.loads(raw)
        return (scheme, who) if isinstance(scheme, dict) else (None, f"{who}: bad split_scheme")
    except Exception as e:  # a report: a registry error never fails validation
        return None, f"champion unavailable: {' '.join(str(e).split())[:160]}"


def champion_tags(layout: Layout, model_name: str, alias: str) -> dict[str, Any]:
    """The champion's version and data tags, without importing mlflow when no registry
    can exist."""
    info: dict[str, Any] = {"model": model_name, "alias": alias}
    try:
        uri, mv = champion_version(layout, model_name, alias)
        if uri is None:
            return {**info, "status": "no registry"}
        if mv is None:
            return {**info, "status": "no champion"}
        tags = mv.tags or {}
        return {**info, "status": "ok", "version": str(mv.version),
                "data_hash": lineage(tags, "data_hash"),
                "dvc_data_md5": lineage(tags, "dvc_data_md5"), "run_id": mv.run_id}
    except Exception as e:  # status is a report: never crash on the registry
        return {**info, "status": f"unavailable: {' '.join(str(e).split())[:160]}"}


def champion_and_latest(params: Params, layout: Layout) -> tuple[dict[str, str], dict[str, str]]:
    """Tags (plus `version`) of the current champion and of the latest version ({} if none)."""
    from mlflow.exceptions import MlflowException

    client = client_for(layout)
    cfg = params.register_
    mv = champion_of(client, cfg.model_name, cfg.alias)
    champion: dict[str, str] = {} if mv is None else _flat(mv)
    latest: dict[str, str] = {}
    try:
        versions = client.search_model_versions(f"name='{cfg.model_name}'")
    except MlflowException:
        versions = []
    versions = [v for v in versions if "parent_version" not in (v.tags or {})]  # not `compact`
    if versions:
        mv = max(versions, key=lambda v: int(v.version))
        latest = _flat(mv)
    return champion, latest


def _flat(mv: Any) -> dict[str, str]:
    """A version's tags with the lineage ones under their bare names, plus `version`."""
    tags = dict(mv.tags or {})
    bare = {k: lineage(tags, k) for k in LINEAGE_KEYS if lineage(tags, k)}
    return {**tags, **bare, "version": str(mv.version)}


def split_against_champion(layout: Layout, scheme: dict[str, Any], model_name: str,
                           alias: str = "champion") -> dict[str, Any]:
    """Validate's `split` record: this data's split scheme beside the champion's (same, a
    new split, or no reference; with a message and the scheme in words)."""
    reference, who = champion_split_scheme(layout, model_name, alias)
    return {**compare_schemes(scheme, reference, who), "scheme": describe_scheme(scheme)}


def version_dvc_file(layout: Layout, model_name: str, ref: str, rel: str) -> dict[str, str]:
    """The `.dvc` file (`rel`, from the project root) a registered version was trained on,
    as text: from its run (`dvc/<file>`, logged by train; a `compact` version's parent run),
    else from its git commit when that was clean; checked against the version's
    `lineage.dvc_data_md5`. A version made by a scheduled sync has only the run's copy."""
    import yaml

    client = client_for(layout)
    version = resolve(client, model_name, ref)
    mv = client.get_model_version(model_name, version)
    who, md5 = f"{model_name} v{version}", lineage(mv.tags, "dvc_data_md5")
    if not md5:
        raise RegistryError(f"{who} records no DVC data version (no lineage.dvc_data_md5 tag)")
    found, where = _run_copy(client, mv.run_id, Path(rel).name)
    commit = lineage(mv.tags, "git_commit")
    if found is None and commit and not commit.endswith("-dirty"):
        proc = subprocess.run(["git", "show", f"{commit}:./{rel}"], cwd=layout.root,
                              capture_output=True, text=True)
        found, where = (proc.stdout if proc.returncode == 0 else None), f"commit {commit[:12]}"
    if found is None:
        raise RegistryError(f"{who} was trained on {rel} md5 {md5}, but neither its run (no "
                            f"dvc/{Path(rel).name}) nor a clean git commit ({commit or 'none'}) "
                            "holds that file")
    try:
        recorded = str(((yaml.safe_load(found) or {}).get("outs") or [{}])[0].get("md5", ""))
    except (yaml.YAMLError, AttributeError, TypeError):
        recorded = ""
    if recorded.removesuffix(".dir") != md5:
        raise RegistryError(f"{who}: {where} records md5 {recorded or 'none'}, not the "
                            f"version's {md5}")
    return {"version": version, "md5": md5, "text": found, "where": where}


def _run_copy(client: Any, run_id: str | None, name: str) -> tuple[str | None, str]:
    """(`dvc/<name>` of a run, or of its parent run: a `compact` version's run is a child of
    the pipeline run; where it was found). (None, "") when neither has it."""
    with tempfile.TemporaryDirectory() as tmp:
        for whose in ("its run's", "its parent run's"):
            if not run_id:
                break
            try:
                local = client.download_artifacts(run_id, f"dvc/{name}", tmp)
                return Path(local).read_text(), f"{whose} dvc/{name}"
            except Exception:  # noqa: BLE001 (no such artifact, or no such run)
                pass
            try:
                run_id = client.get_run(run_id).data.tags.get("mlflow.parentRunId")
            except Exception:  # noqa: BLE001
                break
    return None, ""
