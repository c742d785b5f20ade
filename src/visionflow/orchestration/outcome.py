"""How a `retrain` flow run ends: a final state named after its outcome (Promoted, Rejected,
Skipped, Up to date) with a one-line message, and the outcome as flow-run tags, so the
Prefect runs list and dashboard tell the runs apart."""

from __future__ import annotations

from typing import Any

from prefect.client.orchestration import get_client
from prefect.states import Completed, State


def final_state(report: dict[str, Any], result: dict[str, Any], flow_run: Any,
                logger: Any) -> State:
    """Completed, named after `report["outcome"]["label"]`, its message, `result` as data;
    the flow run tagged with the outcome."""
    outcome = report.get("outcome") or {}
    label, message = outcome.get("label", "completed"), outcome.get("message", "")
    tag_run(flow_run, label, logger)
    return Completed(name=label.capitalize(), message=message[:500], data=result)


def tag_run(flow_run: Any, tag: str, logger: Any) -> None:
    """Add `tag` and `outcome:<tag>` to the flow run's tags; never fails the run."""
    if flow_run is None:
        return
    try:
        with get_client(sync_client=True) as client:
            current = client.read_flow_run(flow_run.id).tags or []
            new = [t for t in (tag, f"outcome:{tag}") if t not in current]
            client.update_flow_run(flow_run.id, tags=[*current, *new])
    except Exception as err:  # noqa: BLE001 (tags are a report, not the job)
        logger.warning("could not tag the flow run with its outcome: %s", err)
