"""Run `prefect server` with SQLAlchemy 2.1 (what constraints.txt pins).

Prefect's scheduler (3.8.8 and 3.9.1) bulk-inserts the runs it schedules as dicts with a
`state` key (a hybrid property on `FlowRun`). SQLAlchemy 2.1 sends hybrid keys of a bulk
INSERT to a `bulk_dml` setter, which Prefect does not define, so the scheduler fails every
loop with "Can't evaluate bulk DML statement" and no scheduled run is ever created.
SQLAlchemy 2.0 ignored such keys (Prefect inserts the states itself right after); this
restores exactly that. It is a no-op on SQLAlchemy 2.0, or once Prefect defines the setter.
Pinning SQLAlchemy<2.1 makes it unnecessary.

Prefect opens most write transactions on SQLite as `BEGIN DEFERRED`: they read first, and
when another connection committed meanwhile, the write fails at once with "database is
locked" (SQLite's busy timeout does not apply to that upgrade); the API answers 503. Beside a
running flow that logs, over 90% of deployment pauses failed so (BENCHMARKS "Prefect's
SQLite write transactions"). Every write transaction here begins IMMEDIATE, as Prefect's own
`with_for_update` ones do: it waits for the writer before it, up to the busy timeout.

    python -m visionflow.orchestration.prefect_compat server start --host 127.0.0.1 --port 4200
"""

from __future__ import annotations

import sys
from collections.abc import MutableMapping
from typing import Any


def _drop(key: str):
    def setter(cls: type, mapping: MutableMapping[str, Any], value: Any) -> None:
        mapping.pop(key, None)  # SQLAlchemy copies each mapping first: the caller's is intact

    return setter


def patch_hybrid_bulk_dml() -> list[str]:
    """Give Prefect's `state` hybrids a bulk-DML setter that ignores the key; returns the
    patched model names (empty when nothing needed patching)."""
    from sqlalchemy.ext.hybrid import hybrid_property

    if not hasattr(hybrid_property, "bulk_dml"):
        return []  # SQLAlchemy 2.0
    from prefect.server.database import orm_models

    patched = []
    for name in ("FlowRun", "TaskRun"):
        cls = getattr(orm_models, name, None)
        prop = vars(cls).get("state") if cls is not None else None
        if isinstance(prop, hybrid_property) and prop.bulk_dml_setter is None:
            prop.bulk_dml_setter = _drop("state")
            patched.append(name)
    return patched


def patch_sqlite_write_transactions() -> bool:
    """Begin every SQLite write transaction IMMEDIATE; False when already patched, or when
    Prefect has no such hook."""
    from prefect.server.database.configurations import AioSqliteConfiguration

    begin = getattr(AioSqliteConfiguration, "begin_transaction", None)
    if begin is None or getattr(begin, "immediate", False):
        return False

    def begin_transaction(self: Any, session: Any, with_for_update: bool = False) -> Any:
        return begin(self, session, with_for_update=True)

    begin_transaction.immediate = True  # type: ignore[attr-defined]
    AioSqliteConfiguration.begin_transaction = begin_transaction  # type: ignore[method-assign]
    return True


def main() -> None:
    patch_hybrid_bulk_dml()
    patch_sqlite_write_transactions()
    from prefect.cli import app

    sys.argv[0] = "prefect"
    app()


if __name__ == "__main__":
    main()
