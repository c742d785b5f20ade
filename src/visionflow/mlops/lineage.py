"""What the registry knows about the data its models were trained on: the champion (and the
latest version), their data tags and data summary. mlflow is imported only when a registry
can exist (the project's sqlite file, or MLFLOW_TRACKING_URI), so a first run stays light."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from visionflow.config import Params
from visionflow.layout import Layout
from visionflow.mlops.registry import champion_of, client_for

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
                "data_hash": tags.get("data_hash", ""),
                "dvc_data_md5": tags.get("dvc_data_md5", ""), "run_id": mv.run_id}
    except Exception as e:  # status is a report: never crash on the registry
        return {**info, "status": f"unavailable: {' '.join(str(e).split())[:160]}"}


def champion_and_latest(params: Params, layout: Layout) -> tuple[dict[str, str], dict[str, str]]:
    """Tags (plus `version`) of the current champion and of the latest version ({} if none)."""
    from mlflow.exceptions import MlflowException

    client = client_for(layout)
    cfg = params.register_
    mv = champion_of(client, cfg.model_name, cfg.alias)
    champion: dict[str, str] = {} if mv is None else {**mv.tags, "version": str(mv.version)}
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
