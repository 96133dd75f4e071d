"""`d4c keys create`, `d4c db upgrade|downgrade` through the real `d4c` parser (in process)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import inspect, select

from app.core.config import get_settings
from app.core.security import hash_key
from app.db.models import ApiKey, Tenant
from app.db.session import make_sync_engine
from d4c_core.cli import main


def test_keys_create_and_db_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("D4C_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("D4C_DATABASE_URL", raising=False)
    monkeypatch.delenv("D4C_BROKER_URL", raising=False)
    get_settings.cache_clear()
    assert main(["db", "upgrade"]) == 0
    capsys.readouterr()

    assert main(["keys", "create", "--tenant", "acme"]) == 0
    key1 = capsys.readouterr().out.strip().splitlines()[-1]
    assert main(["keys", "create", "--tenant", "acme"]) == 0
    out = capsys.readouterr().out
    key2 = out.strip().splitlines()[-1]
    # Says which database holds it: a `d4c serve` elsewhere would not know the key.
    assert str(tmp_path / "d4c.db") in out and "d4c serve" in out
    assert key1 != key2 and len(key1) > 40

    engine = make_sync_engine(get_settings())
    with engine.connect() as conn:
        tenants = conn.execute(select(Tenant.name)).scalars().all()
        rows = conn.execute(select(ApiKey.key_hash, ApiKey.prefix)).all()
    assert tenants == ["acme"]  # created once, reused
    assert sorted(h for h, _ in rows) == sorted([hash_key(key1), hash_key(key2)])
    assert {p for _, p in rows} == {key1[:8], key2[:8]}
    assert all(key1 not in h for h, _ in rows)  # only the hash is stored

    assert main(["db", "downgrade", "base"]) == 0
    with engine.connect() as conn:
        assert set(inspect(conn).get_table_names()) <= {"alembic_version"}
    engine.dispose()
