"""Model registry helpers: open the project's store, list/show/compare versions, move aliases.

Every alias move (the gate, `vflow models promote`, `vflow models rollback`) goes through
`set_champion` under `registry_lock` (a PostgreSQL advisory lock for a shared registry, a
file lock for a local one: see `registry_lock.py`), so the old champion always keeps
`previous` and two concurrent registrations, from any hosts, cannot interleave. Who moved
it, when and why are version tags, and the registered model keeps a short `alias_history`
(JSON) tag.

MLflow notes: `search_model_versions` returns empty aliases in MLflow 3, so aliases are
read from `get_registered_model(name).aliases`; versions may come back as int: every
version here is a str.
"""

from __future__ import annotations

import getpass
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visionflow.core import presets
from visionflow.core.env import quiet_env
from visionflow.core.errors import VisionflowError
from visionflow.core.files import load_yaml
from visionflow.core.layout import Layout
from visionflow.mlops import tracking
from visionflow.mlops.registry_lock import lock_path, registry_lock

__all__ = ["lock_path", "registry_lock"]  # (they live in registry_lock; kept here for callers)

DEFAULT_NAME = "visionflow-classifier"
COMPACT = "compact"  # the champion's compressed copy (mlops/compact.py registers it)
PREVIOUS = "previous"
HISTORY_TAG = "alias_history"
HISTORY_KEEP = 50
# the scalar metrics shown side by side (the `metrics` version tag holds them all)
SHOWN_METRICS = ("top1", "top3", "top5", "f1_macro", "f1_micro", "f1_weighted", "miou", "ece")


class RegistryError(VisionflowError):
    exit_code = 1


def whoami() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry (containers)
        return os.environ.get("USER") or os.environ.get("USERNAME") or "unknown"


def now_utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# --------------------------------------------------------------------------- store


def client_for(where: Layout | str | Path = ".") -> Any:
    """The one way to get an MlflowClient: on the project's store (or MLFLOW_TRACKING_URI),
    no experiment created. `where` is a Layout or a project root."""
    quiet_env()
    from mlflow import MlflowClient

    layout = where if isinstance(where, Layout) else Layout.at(where)
    uri = tracking.tracking_uri(layout)
    tracking.use_uri(uri)  # also for models:/ URIs loaded in this process
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def champion_of(client: Any, name: str, alias: str = "champion") -> Any | None:
    """The one champion lookup: the model version holding `alias`, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def model_name_for(root: str | Path = ".") -> str:
    """`register.model_name` of the project (`register_setting`), else the default."""
    return register_setting(root, "model_name", DEFAULT_NAME)


def register_setting(root: str | Path, key: str, default: str) -> str:
    """`register.<key>` from the project's params.yaml with its preset merged (`preset:
    shapes-unet` names the segmenter), else `default` (no params.yaml: a bare store)."""
    import yaml

    path = Path(root) / "params.yaml"
    try:
        raw = load_yaml(path.read_text()) or {}
        raw = presets.apply_preset(raw, path, raw.get("preset"))
        return str((raw.get("register") or {}).get(key) or default)
    except (OSError, yaml.YAMLError, AttributeError):
        return default


def tracking_uri(client: Any) -> str:
    return str(getattr(client, "_registry_uri", None) or client.tracking_uri)


# --------------------------------------------------------------------------- reading


def _missing(err: Exception) -> bool:
    text = str(err)
    return "RESOURCE_DOES_NOT_EXIST" in text or "not found" in text.lower() or \
        getattr(err, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


def registered_model(client: Any, name: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as err:
        if _missing(err):
            raise RegistryError(f"registered model '{name}' not found in "
                                f"{tracking_uri(client)}{held_instead(client)}") from None
        raise


def held_instead(client: Any, pick: str = "--name NAME") -> str:
    """What a registry holds, for a message about a name it does not: "; it holds: a, b
    (`pick`)", or "; it holds no registered model yet"."""
    names = sorted(m.name for m in client.search_registered_models(max_results=20))
    if not names:
        return "; it holds no registered model yet"
    return f"; it holds: {', '.join(names)} ({pick})"


def alias_map(client: Any, name: str) -> dict[str, str]:
    """alias -> version (str)."""
    rm = registered_model(client, name)
    return {str(a): str(v) for a, v in (rm.aliases or {}).items()}


def aliases_by_version(client: Any, name: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for alias, version in sorted(alias_map(client, name).items()):
        out.setdefault(version, []).append(alias)
    return out


def current_alias(client: Any, name: str, alias: str) -> str | None:
    """The version (str) holding `alias`, or None."""
    mv = champion_of(client, name, alias)
    return None if mv is None else str(mv.version)


def all_versions(client: Any, name: str) -> list[Any]:
    """Every version of `name`, newest first."""
    registered_model(client, name)
    found = client.search_model_versions(f"name='{name}'", max_results=10_000)
    return sorted(found, key=lambda mv: int(mv.version), reverse=True)


def resolve(client: Any, name: str, ref: str) -> str:
    """'3', 'v3', 'champion' or '@champion' -> '3' (checked to exist)."""
    from mlflow.exceptions import MlflowException

    ref = str(ref).strip()
    key = ref.removeprefix("@")
    if key.lower().removeprefix("v").isdigit():
        version = key.lower().removeprefix("v")
        try:
            client.get_model_version(name, version)
        except MlflowException:
            registered_model(client, name)
            known = ", ".join(str(mv.version) for mv in reversed(all_versions(client, name)))
            raise RegistryError(f"model '{name}': version {version} not found "
                                f"(versions: {known or 'none'})") from None
        return version
    version = current_alias(client, name, key)
    if version is None:
        aliases = ", ".join(sorted(alias_map(client, name))) or "none"
        raise RegistryError(f"model '{name}': no version has alias '{key}' "
                            f"(aliases: {aliases})")
    return version


TEST_PREFIX = "test/"  # a logged model's metrics on the test split (publish logs them)


def version_metrics(mv: Any, client: Any | None = None) -> dict[str, float]:
    """The test metrics of a version: its logged model's own (`test/top1` -> `top1`), or,
    for versions registered before those existed, its `metrics` / `top1` tags."""
    found = _model_metrics(client, model_id_of(mv)) if client else {}
    if found:
        return found
    raw = (mv.tags or {}).get("metrics")
    if raw:
        try:
            return {k: float(v) for k, v in json.loads(raw).items()}
        except (ValueError, TypeError, AttributeError):
            pass
    top1 = (mv.tags or {}).get("top1")
    return {"top1": float(top1)} if top1 else {}


def model_id_of(mv: Any) -> str | None:
    """The logged model behind a version (some stores leave `model_id` unset: the source
    `models:/m-...` names it)."""
    found = getattr(mv, "model_id", None)
    source = str(getattr(mv, "source", "") or "")
    if not found and source.startswith("models:/m-"):
        found = source.removeprefix("models:/").split("/")[0]
    return found or None


def _model_metrics(client: Any, model_id: str | None) -> dict[str, float]:
    if not model_id:
        return {}
    from mlflow.exceptions import MlflowException

    try:
        found = client.get_logged_model(model_id).metrics or []
    except MlflowException:  # a model gone from the store: nothing to show
        return {}
    out = {m.key.removeprefix(TEST_PREFIX): float(m.value) for m in found
           if m.key.startswith(TEST_PREFIX)}
    ordered = [k for k in SHOWN_METRICS if k in out]
    return {k: out[k] for k in ordered + sorted(set(out) - set(ordered))}


@dataclass
class VersionInfo:
    version: str
    aliases: list[str]
    created: str
    run_id: str
    status: str
    source: str
    tags: dict[str, str]
    metrics: dict[str, float]
    description: str

    @property
    def gate(self) -> str:
        return self.tags.get("gate_decision", "")

    def as_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def _info(mv: Any, aliases: dict[str, list[str]], client: Any = None) -> VersionInfo:
    created = time.strftime("%Y-%m-%d %H:%M", time.localtime(int(mv.creation_timestamp) / 1000))
    return VersionInfo(str(mv.version), aliases.get(str(mv.version), []), created,
                       mv.run_id or "", str(mv.status), str(mv.source), dict(mv.tags or {}),
                       version_metrics(mv, client), mv.description or "")


def list_versions(client: Any, name: str) -> list[VersionInfo]:
    aliases = aliases_by_version(client, name)
    return [_info(mv, aliases, client) for mv in all_versions(client, name)]


def show_version(client: Any, name: str, ref: str) -> VersionInfo:
    version = resolve(client, name, ref)
    mv = client.get_model_version(name, version)
    return _info(mv, aliases_by_version(client, name), client)


def compare_versions(client: Any, name: str, ref_a: str,
                     ref_b: str) -> tuple[VersionInfo, VersionInfo, list[tuple], list[tuple]]:
    """(a, b, metric rows (name, a, b, b - a), tag rows (key, a, b) that differ)."""
    a, b = show_version(client, name, ref_a), show_version(client, name, ref_b)
    keys = [k for k in SHOWN_METRICS if k in a.metrics or k in b.metrics]
    keys += sorted((set(a.metrics) | set(b.metrics)) - set(keys))
    rows = []
    for k in keys:
        va, vb = a.metrics.get(k), b.metrics.get(k)
        rows.append((k, va, vb, None if va is None or vb is None else vb - va))
    skip = {"metrics", "params", "compact_metrics"}
    tag_rows = [(k, a.tags.get(k, ""), b.tags.get(k, ""))
                for k in sorted(set(a.tags) | set(b.tags))
                if k not in skip and a.tags.get(k) != b.tags.get(k)]
    return a, b, rows, tag_rows


# --------------------------------------------------------------------------- moving aliases


def _append_history(client: Any, name: str, entry: dict[str, Any]) -> None:
    rm = registered_model(client, name)
    try:
        history = json.loads((rm.tags or {}).get(HISTORY_TAG, "[]"))
    except ValueError:
        history = []
    history = [*history, entry][-HISTORY_KEEP:]
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))


ABANDONED = "abandoned"


def abandon_interrupted(client: Any, name: str, run_id: str) -> list[str]:
    """Tag the versions an interrupted registration of this run left behind (created, never
    decided: no gate or compact tags) as `gate_decision=abandoned`. Call it under the
    registry lock, before registering again; returns their versions."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_model_versions(f"name='{name}' and run_id='{run_id}'",
                                             max_results=1000)
    except MlflowException:
        return []
    left = [str(mv.version) for mv in found
            if not {"gate_decision", "compact_alias"} & set(mv.tags or {})]
    for version in left:
        client.set_model_version_tag(name, version, "gate_decision", ABANDONED)
        client.set_model_version_tag(name, version, "gate_reason",
                                     "registration interrupted; retried as a newer version")
    return left


def history(client: Any, name: str) -> list[dict[str, Any]]:
    try:
        return json.loads((registered_model(client, name).tags or {}).get(HISTORY_TAG, "[]"))
    except ValueError:
        return []


def set_champion(client: Any, name: str, version: str, alias: str = "champion",
                 action: str = "promote", by: str | None = None,
                 reason: str = "") -> str | None:
    """Point `alias` at `version`; the old holder gets `previous`. Returns the old holder.

    Records who, when, why and how (`gate`, `promote`, `rollback`) as tags on the new
    holder (`champion_*`) and on the old one (`demoted_*`), and in `alias_history`.
    Hold `registry_lock` around the call.
    """
    version = str(version)
    old = current_alias(client, name, alias)
    by = by or whoami()
    when = now_utc()
    if old is not None and old != version:
        client.set_registered_model_alias(name, PREVIOUS, old)
        for k, v in {"demoted_by": by, "demoted_at": when, "demoted_action": action,
                     "demoted_reason": reason, "demoted_for": version}.items():
            if v:
                client.set_model_version_tag(name, old, k, v[:5000])
    client.set_registered_model_alias(name, alias, version)
    for k, v in {"champion_by": by, "champion_at": when, "champion_action": action,
                 "champion_reason": reason, "champion_replaced": old or ""}.items():
        if v:  # no empty tags (a first champion replaced nothing)
            client.set_model_version_tag(name, version, k, v[:5000])
    _append_history(client, name, {"at": when, "action": action, "alias": alias,
                                   "from": old, "to": version, "by": by,
                                   "reason": reason[:300]})
    return old


def follow_champion(client: Any, name: str, champion: str, why: str) -> str | None:
    """After a promote or rollback: `compact` onto the newest compressed copy of the new
    champion (or the champion itself, if it is one), or removed when it has none, so that it
    never serves a copy of another version. Hold `registry_lock`. What moved, or None."""
    current = current_alias(client, name, COMPACT)
    copies = [int(mv.version) for mv in all_versions(client, name) if "compact_variant" in (
        tags := mv.tags or {}) and champion in (tags.get("parent_version"), str(mv.version))]
    target = str(max(copies)) if copies else None
    if target == current:
        return None
    if target is None:
        client.delete_registered_model_alias(name, COMPACT)
        client.set_model_version_tag(name, current, "compact_alias", f"removed: v{champion} "
                                     f"became the champion ({why}) and has no compressed copy")
        return f"@{COMPACT} removed from v{current}: v{champion} has no compressed copy"
    client.set_registered_model_alias(name, COMPACT, target)
    client.set_model_version_tag(name, target, "compact_alias", f"set: the compressed copy "
                                 f"of v{champion}, the champion again ({why})")
    return f"@{COMPACT} -> v{target}, the compressed copy of v{champion}"


def promote(client: Any, name: str, ref: str, reason: str, alias: str = "champion",
            by: str | None = None) -> tuple[str | None, str]:
    """Manual promotion (bypasses the gate, records who and why). Returns (old, new)."""
    if not reason.strip():
        raise RegistryError("promote: --reason must not be empty")
    with registry_lock(tracking_uri(client)):
        version = resolve(client, name, ref)
        if current_alias(client, name, alias) == version:
            raise RegistryError(f"model '{name}': version {version} already has alias '{alias}'")
        old = set_champion(client, name, version, alias, "promote", by, reason.strip())
    return old, version


def rollback(client: Any, name: str, reason: str, to: str | None = None,
             alias: str = "champion", by: str | None = None) -> tuple[str | None, str]:
    """Move `alias` back to `previous` (or to `to`). Returns (old, new)."""
    if not reason.strip():
        raise RegistryError("rollback: --reason must not be empty")
    with registry_lock(tracking_uri(client)):
        if to is not None:
            target = resolve(client, name, to)
        else:
            target = current_alias(client, name, PREVIOUS)
            if target is None:
                registered_model(client, name)
                raise RegistryError(f"rollback: model '{name}' has no '{PREVIOUS}' alias; "
                                    "pass --to VERSION")
        current = current_alias(client, name, alias)
        if current == target:
            raise RegistryError(f"rollback: version {target} of '{name}' already has alias "
                                f"'{alias}'")
        old = set_champion(client, name, target, alias, "rollback", by, reason.strip())
    return old, target
