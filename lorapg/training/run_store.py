"""The training run history: one SQLite row per run, queued to finished, kept across restarts.

Follows the gallery store's conventions (lorapg/gallery/store.py): WAL with a busy timeout, one
connection per call, short ``BEGIN IMMEDIATE`` writes under one in-process lock, numbered migrations
in ``PRAGMA user_version``.

A row names the process that queued it (``process``: a token whose lock file that process holds
while it lives). At start-up a store marks the queued and running rows of processes that are gone
as failed ("interrupted"), and leaves alone those of a process that still runs: the CLI's
``python -m lorapg train`` and the app may share the folder and the history.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorapg.errors import UserError, shorten
from lorapg.sqlite_schema import immediate_transaction, prepare_database

logger = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
STATUSES = (QUEUED, RUNNING, DONE, FAILED, CANCELLED)
UNFINISHED = (QUEUED, RUNNING)
MAX_LOSS_POINTS = 2000  # a longer curve is thinned to every N-th step (plus the last): enough to plot

SCHEMA_VERSION = 1
_BUSY_TIMEOUT_MS = 30_000
_SCHEMA_V1 = (
    """
    CREATE TABLE runs (
        seq INTEGER PRIMARY KEY,            -- queue order
        id TEXT NOT NULL UNIQUE,            -- the job id the API and the Train tab show
        name TEXT NOT NULL,
        owner TEXT,                         -- the visitor (NULL where visitors are not kept apart)
        status TEXT NOT NULL,
        config TEXT NOT NULL,               -- the TrainConfig as JSON
        created_at REAL NOT NULL,           -- Unix times
        started_at REAL,
        finished_at REAL,
        duration_s REAL,
        steps INTEGER NOT NULL DEFAULT 0,
        total_steps INTEGER NOT NULL DEFAULT 0,
        final_loss REAL,
        losses TEXT NOT NULL DEFAULT '[]',  -- [[step, loss], ...]
        lora_path TEXT,
        epoch_loras TEXT NOT NULL DEFAULT '[]',
        samples TEXT NOT NULL DEFAULT '[]', -- [[label, path], ...]
        error TEXT,
        process TEXT NOT NULL,
        -- What the duration estimate of later runs is made of (lorapg/training/estimate.py).
        model TEXT NOT NULL DEFAULT '',
        resolution INTEGER,                 -- trained size in pixels (NULL: not known)
        batch_size INTEGER NOT NULL DEFAULT 1,
        seconds_per_step REAL,
        overhead_s REAL                     -- loading and saving: duration beyond the steps
    )
    """,
    "CREATE INDEX runs_by_status ON runs(status, seq)",
)
_MIGRATIONS: dict[int, Sequence[str]] = {1: _SCHEMA_V1}


@dataclass
class RunRecord:
    id: str
    name: str
    status: str
    config: dict[str, Any]
    created_at: float
    owner: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    duration_s: float | None = None
    steps: int = 0
    total_steps: int = 0
    final_loss: float | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)
    lora_path: str | None = None
    epoch_loras: list[str] = field(default_factory=list)
    samples: list[tuple[str, str]] = field(default_factory=list)  # (label, PNG path)
    error: str | None = None
    model: str = ""
    resolution: int | None = None
    batch_size: int = 1
    seconds_per_step: float | None = None
    overhead_s: float | None = None

    @property
    def finished(self) -> bool:
        return self.status not in UNFINISHED


@dataclass(frozen=True)
class RunOutcome:
    """What a run left when it ended (``RunStore.finish``)."""

    status: str
    steps: int = 0
    total_steps: int = 0
    losses: Sequence[tuple[int, float]] = ()
    lora_path: str | None = None
    epoch_loras: Sequence[str] = ()
    samples: Sequence[tuple[str, str]] = ()
    error: str | None = None
    resolution: int | None = None
    seconds_per_step: float | None = None  # measured over ``session_steps`` (a resumed run's own steps)
    session_steps: int = 0


def thin_losses(losses: Sequence[tuple[int, float]], limit: int = MAX_LOSS_POINTS) -> list[tuple[int, float]]:
    """At most ``limit`` points of the curve: every N-th one, and always the last (the final loss)."""
    points = [(int(step), float(loss)) for step, loss in losses]
    if len(points) <= limit:
        return points
    stride = -(-len(points) // (limit - 1))  # ceiling: leaves room for the last point
    kept = points[::stride]
    return kept if kept[-1] == points[-1] else [*kept, points[-1]]


class _ProcessLock:
    """This process's token and the lock file it holds while it lives (the OS drops it at exit)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.token = uuid.uuid4().hex
        folder.mkdir(parents=True, exist_ok=True)
        # Locked under a temporary name, then renamed: a ``*.lock`` file is never seen unlocked while
        # its process lives, so ``sweep`` cannot take a starting process's file for litter.
        temp = folder / f".{self.token}.locking"
        self._handle = open(temp, "a+b")  # noqa: SIM115 (held open on purpose)
        _try_lock(self._handle)
        os.replace(temp, folder / f"{self.token}.lock")  # move-only: an empty file, renamed while locked

    def alive(self, token: str) -> bool:
        """Whether the process that holds ``token`` still runs (it holds its lock file)."""
        if token == self.token:
            return True
        path = self.folder / f"{token}.lock"
        if not path.exists():
            return False
        with open(path, "a+b") as handle:
            if not _try_lock(handle):
                return True
        path.unlink(missing_ok=True)  # its process is gone: the file is litter now
        return False

    def sweep(self) -> None:
        """Remove the lock files of processes that have ended (each run of the app or CLI leaves one)."""
        for path in self.folder.glob("*.lock"):
            if path.stem != self.token:
                with contextlib.suppress(OSError):
                    self.alive(path.stem)

    def close(self) -> None:
        self._handle.close()
        (self.folder / f"{self.token}.lock").unlink(missing_ok=True)


def _try_lock(handle) -> bool:
    """An exclusive, non-blocking lock on the open file; False when another holder has it."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; every other process's run counts as interrupted
        return True
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class RunStore:
    """Training runs in ``db_path`` (created with its folder when missing)."""

    def __init__(self, db_path: str | Path):
        self.db_path = Path(db_path)
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self._write_lock = threading.Lock()
        self._initialise()
        self._process = _ProcessLock(self.db_path.parent / "locks")

    # --- connections -------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.db_path, timeout=_BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA synchronous = NORMAL")
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._write_lock, closing(self._open()) as conn, immediate_transaction(conn):
            yield conn

    def _initialise(self) -> None:
        prepare_database(
            self._open,
            self.db_path,
            what="training run database",
            migrations=_MIGRATIONS,
            recovery="the history starts empty (LoRAs and checkpoints are not in it).",
        )

    def close(self) -> None:
        """Release this process's token: its unfinished rows count as interrupted from now on."""
        self._process.close()

    # --- writes ------------------------------------------------------------------------------

    def add(self, record: RunRecord) -> None:
        """A new run, queued (or in whatever status ``record`` has)."""
        with self._write() as conn:
            conn.execute(
                """INSERT INTO runs (id, name, owner, status, config, created_at, process, model,
                    resolution, batch_size) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (
                    record.id,
                    record.name,
                    record.owner,
                    record.status,
                    json.dumps(record.config),
                    record.created_at,
                    self._process.token,
                    record.model,
                    record.resolution,
                    record.batch_size,
                ),
            )

    def start(self, run_id: str, started_at: float | None = None) -> None:
        with self._write() as conn:
            conn.execute(
                "UPDATE runs SET status = ?, started_at = ? WHERE id = ?",
                (RUNNING, time.time() if started_at is None else started_at, run_id),
            )

    def finish(self, run_id: str, outcome: RunOutcome, finished_at: float | None = None) -> None:
        """Record the end of a run; the duration counts from its start (none when it never started)."""
        finished_at = time.time() if finished_at is None else finished_at
        losses = thin_losses(outcome.losses)
        with self._write() as conn:
            row = conn.execute("SELECT started_at, resolution FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None:
                return  # removed from the history meanwhile
            started = row["started_at"]
            duration = finished_at - started if started is not None else None
            overhead = None
            if duration is not None and outcome.seconds_per_step and outcome.session_steps:
                overhead = max(0.0, duration - outcome.session_steps * outcome.seconds_per_step)
            conn.execute(
                """UPDATE runs SET status = ?, finished_at = ?, duration_s = ?, steps = ?, total_steps = ?,
                    final_loss = ?, losses = ?, lora_path = ?, epoch_loras = ?, samples = ?, error = ?,
                    resolution = ?, seconds_per_step = ?, overhead_s = ? WHERE id = ?""",
                (
                    outcome.status,
                    finished_at,
                    duration,
                    outcome.steps,
                    outcome.total_steps,
                    losses[-1][1] if losses else None,
                    json.dumps(losses),
                    outcome.lora_path,
                    json.dumps(list(outcome.epoch_loras)),
                    json.dumps([list(sample) for sample in outcome.samples]),
                    outcome.error,
                    outcome.resolution if outcome.resolution is not None else row["resolution"],
                    outcome.seconds_per_step if outcome.session_steps else None,
                    overhead,
                    run_id,
                ),
            )

    def remove(self, run_id: str) -> bool:
        with self._write() as conn:
            return conn.execute("DELETE FROM runs WHERE id = ?", (run_id,)).rowcount > 0

    def mark_interrupted(self) -> list[str]:
        """Queued and running runs of processes that are gone become failed; their ids."""
        with self._write() as conn:
            rows = conn.execute(
                f"SELECT id, status, process FROM runs WHERE status IN ({','.join('?' * len(UNFINISHED))})",
                UNFINISHED,
            ).fetchall()
            gone = [row for row in rows if not self._process.alive(row["process"])]
            for row in gone:
                where = "while it ran" if row["status"] == RUNNING else "before it started"
                conn.execute(
                    "UPDATE runs SET status = ?, error = ?, finished_at = COALESCE(finished_at, ?) WHERE id = ?",
                    (FAILED, f"interrupted: the app stopped {where}", time.time(), row["id"]),
                )
        for row in gone:
            logger.warning("training run %s was interrupted (the app stopped); marked failed", row["id"])
        self._process.sweep()
        return [row["id"] for row in gone]

    # --- reads -------------------------------------------------------------------------------

    def get(self, run_id: str) -> RunRecord | None:
        with closing(self._open()) as conn:
            row = conn.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        return _record(row) if row is not None else None

    def runs(self, status: str | None = None, owner: str | None = None) -> list[RunRecord]:
        """Runs in queue order (oldest first); ``status`` / ``owner`` filter when given."""
        if status is not None and status not in STATUSES:
            raise UserError(f"status {shorten(status, 20)!r} is not a run status; use one of {', '.join(STATUSES)}.")
        clauses, args = [], []
        if status is not None:
            clauses.append("status = ?")
            args.append(status)
        if owner is not None:
            clauses.append("owner = ?")
            args.append(owner)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        with closing(self._open()) as conn:
            rows = conn.execute(f"SELECT * FROM runs {where} ORDER BY seq", args).fetchall()
        return [_record(row) for row in rows]

    def measured(self) -> list[RunRecord]:
        """Finished runs with a measured speed, newest first (what estimates are made of)."""
        with closing(self._open()) as conn:
            rows = conn.execute(
                "SELECT * FROM runs WHERE seconds_per_step IS NOT NULL AND steps > 0 ORDER BY seq DESC"
            ).fetchall()
        return [_record(row) for row in rows]


def _record(row: sqlite3.Row) -> RunRecord:
    return RunRecord(
        id=row["id"],
        name=row["name"],
        owner=row["owner"],
        status=row["status"],
        config=json.loads(row["config"]),
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        duration_s=row["duration_s"],
        steps=row["steps"],
        total_steps=row["total_steps"],
        final_loss=row["final_loss"],
        losses=[(int(step), float(loss)) for step, loss in json.loads(row["losses"])],
        lora_path=row["lora_path"],
        epoch_loras=list(json.loads(row["epoch_loras"])),
        samples=[(str(label), str(path)) for label, path in json.loads(row["samples"])],
        error=row["error"],
        model=row["model"],
        resolution=row["resolution"],
        batch_size=row["batch_size"],
        seconds_per_step=row["seconds_per_step"],
        overhead_s=row["overhead_s"],
    )


def history_dir(models_dir: str | Path) -> Path:
    """``models/training_runs``: the database, the lock files and each run's kept samples. Not under
    ``models/training``, whose folders are the runs' work folders, named as the user names runs."""
    return Path(models_dir) / "training_runs"
