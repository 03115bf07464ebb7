"""The sqlite MLflow store of a run folder, created so that a kill cannot break it.

MLflow creates its sqlite schema on first use, in many statements and an alembic migration
history. A SIGKILL in the middle of that (found by :mod:`unimoe.fault_injection`: the first
seconds of a curriculum) leaves a ``mlflow.db`` with half the tables, and every later run on
that folder fails in MLflow's start-up. :func:`sqlite_tracking_uri` therefore builds a new
store in a temporary file and links it into place only when complete; once it exists,
sqlite's own transactions keep it consistent.
"""

from __future__ import annotations

import os
from pathlib import Path

DB_NAME = "mlflow.db"


def sqlite_tracking_uri(folder: str | Path, create: bool = True) -> str:
    """``sqlite:///<folder>/mlflow.db`` (absolute, so any cwd works), created atomically if absent."""
    db = Path(folder).resolve() / DB_NAME
    if create and not db.exists():
        _create_store(db)
    return f"sqlite:///{db}"


def _create_store(db: Path) -> None:
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    db.parent.mkdir(parents=True, exist_ok=True)
    tmp = db.with_name(f".{db.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        store = SqlAlchemyStore(f"sqlite:///{tmp}", (db.parent / "mlartifacts").as_uri())
        store.engine.dispose()
        try:
            os.link(tmp, db)  # never replaces a store another process created meanwhile
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)
