"""What the app's SQLite databases (the gallery, the training run history) share: WAL mode, numbered
migrations recorded in ``PRAGMA user_version``, and IMMEDIATE write transactions."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from pathlib import Path

from lorapg.errors import UserError

logger = logging.getLogger(__name__)


@contextmanager
def immediate_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A short write transaction. IMMEDIATE takes the write lock up front: a deferred transaction
    that upgrades later can fail with SQLITE_BUSY without waiting."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def prepare_database(
    connect: Callable[[], sqlite3.Connection],
    db_path: Path,
    *,
    what: str,
    migrations: Mapping[int, Sequence[str]],
    recovery: str,
) -> None:
    """WAL mode, then every migration after the file's ``user_version`` (version N runs
    ``migrations[N]``). ``what`` names the database in messages; ``recovery`` says what moving a
    broken file aside costs the user."""
    try:
        with closing(connect()) as conn:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                logger.warning("%s %s is in %s mode, not WAL", what, db_path, mode)
            with immediate_transaction(conn):
                _migrate(conn, db_path, what, migrations)
    except sqlite3.DatabaseError as exc:
        raise UserError(
            f"The {what} '{db_path}' cannot be opened ({exc}). Move it aside and restart: {recovery}"
        ) from exc


def _migrate(conn: sqlite3.Connection, db_path: Path, what: str, migrations: Mapping[int, Sequence[str]]) -> None:
    latest = max(migrations)
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > latest:
        raise UserError(
            f"The {what} '{db_path}' was made by a newer LoRA Playground "
            f"(schema {version}, this one knows {latest}); update the app."
        )
    for target in range(version + 1, latest + 1):
        for statement in migrations[target]:
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {target}")
        logger.info("%s %s migrated to schema %d", what, db_path, target)
