"""Which registry lock a store gets (no servers: fast). The PostgreSQL advisory lock itself,
across hosts and across a database restart, is exercised on the team stack
(tests/pipeline/test_stack*.py)."""

from __future__ import annotations

import pytest

from visionflow.mlops import registry_lock


def test_registry_lock_kind(monkeypatch, tmp_path):
    monkeypatch.delenv(registry_lock.LOCK_URL_VAR, raising=False)
    sqlite = f"sqlite:///{tmp_path}/mlflow.db"
    assert registry_lock.lock_url(sqlite) is None
    assert registry_lock.lock_path(sqlite) == tmp_path / ".mlflow.db.register.lock"
    pg = "postgresql+psycopg://u:p@db.example:5433/mlflow"
    assert registry_lock.lock_url(pg) == "postgresql://u:p@db.example:5433/mlflow"
    assert registry_lock.lock_url("http://mlflow:5000") is None  # a server: see the warning
    monkeypatch.setenv(registry_lock.LOCK_URL_VAR, "postgresql://l:s@db:5432/mlflow")
    assert registry_lock.lock_url("http://mlflow:5000") == "postgresql://l:s@db:5432/mlflow"
    monkeypatch.setenv(registry_lock.LOCK_URL_VAR, "mysql://l:secret@db:3306/x")
    with pytest.raises(registry_lock.RegistryLockError) as err:
        registry_lock.lock_url("http://mlflow:5000")
    assert "db:3306/x" in str(err.value) and "secret" not in str(err.value)


def test_a_server_without_a_lock_url_warns_once(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv(registry_lock.LOCK_URL_VAR, raising=False)
    monkeypatch.setattr(registry_lock.tempfile, "gettempdir", lambda: str(tmp_path))
    for _ in range(2):
        with registry_lock.registry_lock("http://127.0.0.1:1") as held:
            assert held.kind == "file"
    assert capsys.readouterr().err.count("serialised on this host only") == 1
