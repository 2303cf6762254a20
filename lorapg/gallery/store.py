"""The gallery: PNG files on disk plus an SQLite index of how each one was made.

Invariants, and how they survive crashes and threads:

- A PNG is written (atomically) *before* its row is inserted. A crash in between leaves an
  orphan PNG that still carries its A1111 text; ``reconcile`` imports it back at start-up.
- A file is deleted *before* its row, inside the same write transaction. A crash in between
  leaves a row without a file; ``reconcile`` drops it. The reverse order would leave an orphan
  PNG that reconcile would resurrect.
- Every write runs in a short ``BEGIN IMMEDIATE`` transaction under one in-process lock; SQLite
  is in WAL mode with a busy timeout, so readers never block and other processes wait instead
  of failing with "database is locked". Each call opens its own connection, so the store can be
  shared freely between Gradio's worker threads.
"""

from __future__ import annotations

import builtins
import logging
import sqlite3
import threading
import uuid
import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from PIL import Image

from lorapg.atomic_files import atomic_write
from lorapg.errors import UserError
from lorapg.gallery.a1111 import format_parameters, parse_parameters
from lorapg.gallery.png import is_temp_file, read_png_metadata, save_png_atomically
from lorapg.gallery.records import (
    ATTACHMENTS,
    ImageRecord,
    Img2ImgUse,
    LoraUse,
    attachment_path,
    check_image_id,
    distilled_fields,
    is_attachment,
    record_from_parsed,
)
from lorapg.sqlite_schema import immediate_transaction, prepare_database

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2
_BUSY_TIMEOUT_MS = 30_000
_IN_CHUNK = 500  # ids per "IN (...)" query, well under SQLite's variable limit

# Version 1. Later versions append statements to _MIGRATIONS; never edit a released one.
_SCHEMA_V1 = (
    """
    CREATE TABLE images (
        id INTEGER PRIMARY KEY,
        created_at TEXT NOT NULL,          -- ISO 8601, UTC, fixed width: sorts as text
        path TEXT NOT NULL UNIQUE,         -- relative to images_dir, '/' separated
        prompt TEXT NOT NULL DEFAULT '',
        negative_prompt TEXT NOT NULL DEFAULT '',
        seed INTEGER,
        steps INTEGER,
        guidance REAL,
        sampler TEXT,
        width INTEGER,
        height INTEGER,
        model_name TEXT,
        model_hash TEXT,
        job_id TEXT,
        starred INTEGER NOT NULL DEFAULT 0,
        parameters TEXT NOT NULL DEFAULT '',  -- the A1111 text written into the PNG
        version TEXT
    )
    """,
    """
    CREATE TABLE image_loras (
        image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        scale REAL NOT NULL,
        file_hash TEXT
    )
    """,
    "CREATE INDEX images_by_created ON images(created_at, id)",
    "CREATE INDEX image_loras_by_image ON image_loras(image_id)",
    "CREATE INDEX image_loras_by_name ON image_loras(name COLLATE NOCASE)",
)
# Version 2: the visitor who made each image, so a public app shows everyone only their own
# (NULL: made where visitors are not kept apart, e.g. locally or before this version).
_SCHEMA_V2 = (
    "ALTER TABLE images ADD COLUMN owner TEXT",
    "CREATE INDEX images_by_owner ON images(owner, created_at, id)",
)
_MIGRATIONS: dict[int, Sequence[str]] = {1: _SCHEMA_V1, 2: _SCHEMA_V2}

_NEWEST_FIRST = "ORDER BY created_at DESC, id DESC"


# Parameters that have no column of their own: the row's A1111 text (the PNG's) keeps them.
_TEXT_ONLY_KEYS = ("Clip skip:", "Variation seed:", "Distilled CFG Scale:")


def _with_text_only_fields(record: ImageRecord, text: str) -> ImageRecord:
    """``record`` with the parameters only its A1111 text holds (Clip skip, Variation seed and
    strength) read back, so Reuse by id restores them as PNG Info does; no schema change needed."""
    if not any(key in text for key in _TEXT_ONLY_KEYS):
        return record  # most images: nothing to parse
    parsed = parse_parameters(text)
    return replace(
        record,
        clip_skip=parsed.clip_skip,
        variation_seed=parsed.variation_seed,
        variation_strength=parsed.variation_strength,
        **distilled_fields(parsed),
    )


def _as_utc(moment: datetime) -> datetime:
    # Naive datetimes in this app are local time.
    return (moment if moment.tzinfo else moment.astimezone()).astimezone(UTC)


def _utc_iso(moment: datetime) -> str:
    return _as_utc(moment).isoformat(timespec="microseconds")


def _owner_filter(owner: str | None) -> tuple[str, tuple[str, ...]]:
    """An ``AND owner = ?`` clause and its argument; nothing when every owner's rows count."""
    return ("", ()) if owner is None else (" AND owner = ?", (owner,))


_WORD_SEPARATOR = "\n"  # str.split() never leaves one inside a word


def _contains_all_casefolded(text: str | None, words: str) -> int:
    """1 when every ``_WORD_SEPARATOR``-joined casefolded word is in ``text`` (any case).

    One SQL call for all words: one call per word made a search of ~1000 words fail with
    SQLite's "Expression tree is too large". SQLite's LIKE and lower() only fold ASCII.
    """
    folded = (text or "").casefold()
    return int(all(word in folded for word in words.split(_WORD_SEPARATOR)))


def _hires_of(text: str | None):
    """The hires fix's fields read back from the row's A1111 text (no columns of their own)."""
    if not text or "Hires" not in text:
        return None
    return parse_parameters(text).hires


def _img2img_of(text: str | None) -> Img2ImgUse | None:
    """img2img's fields read back from the row's A1111 text (no columns of their own)."""
    if not text or "Denoising strength" not in text:
        return None
    return parse_parameters(text).img2img


def _controlnet_of(text: str | None) -> list:
    """The ControlNet units read back from the row's A1111 text (no columns of their own)."""
    if not text or "ControlNet" not in text:
        return []
    return parse_parameters(text).controlnet


class GalleryStore:
    """Images on disk under ``images_dir`` plus their SQLite rows in ``db_path``.

    ``keep`` is how many unstarred images to keep (0 keeps all); starred images are never
    pruned and do not count toward it.
    """

    def __init__(self, db_path: str | Path, images_dir: str | Path, keep: int = 20) -> None:
        if keep < 0:
            raise UserError(f"The gallery size must be 0 (keep all) or more, not {keep}.")
        self.keep = keep
        self.db_path = Path(db_path)
        self.images_dir = Path(images_dir).resolve()
        self.images_dir.mkdir(parents=True, exist_ok=True)
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self._write_lock = threading.Lock()
        self._initialise()
        # Held open, idle after one read (which attaches it to the WAL). The last connection to close
        # checkpoints the WAL into the database file and deletes it, with fsyncs: each write's
        # short-lived connection did that (two per saved image: insert and prune), 5-10 ms on a busy
        # disk. With this one open, SQLite checkpoints on its own every ~1000 WAL pages
        # (wal_autocheckpoint); what a commit guarantees is unchanged.
        self._wal_keeper = sqlite3.connect(self.db_path, check_same_thread=False)
        self._wal_keeper.execute("SELECT count(*) FROM sqlite_master").fetchone()
        # Closed when the store goes, or at exit if it is still there. Not left to the connection's own
        # end: a sqlite3 connection sits in reference cycles, and the entry points freeze the heap on the
        # way out (lorapg.process_exit), so it would never be collected: the WAL would stay unmerged
        # beside the database (gallery.sqlite3-wal, -shm).
        self._close_keeper = weakref.finalize(self, self._wal_keeper.close)

    def close(self) -> None:
        """Close the WAL keeper, so the WAL is checkpointed into the database and deleted (idempotent).

        The store still works afterwards: each read and write opens its own connection."""
        self._close_keeper()

    # ----------------------------------------------------------------------------------------
    # Connections and transactions

    def _open(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN ourselves, so no hidden transactions linger.
        conn = sqlite3.connect(self.db_path, timeout=_BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA foreign_keys = ON")
        # NORMAL in WAL mode can lose the last commit on power loss, never corrupt the file;
        # reconcile re-imports the PNG such a commit described.
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.create_function("lorapg_contains_all", 2, _contains_all_casefolded, deterministic=True)
        return conn

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot for several SELECTs (WAL readers never wait for writers)."""
        with closing(self._open()) as conn:
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.execute("COMMIT")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._write_lock, closing(self._open()) as conn, immediate_transaction(conn):
            yield conn

    def _initialise(self) -> None:
        prepare_database(
            self._open,
            self.db_path,
            what="gallery database",
            migrations=_MIGRATIONS,
            recovery="the gallery is rebuilt from the PNG files.",
        )

    # ----------------------------------------------------------------------------------------
    # Paths

    def _new_relative_path(self, created_at: datetime, seed: int | None) -> str:
        # Folder and file names are for people: local time.
        local = created_at.astimezone()
        short_id = uuid.uuid4().hex[:8]
        seed_text = "noseed" if seed is None else str(seed)
        return f"{local:%Y-%m-%d}/{local:%H%M%S}-{seed_text}-{short_id}.png"

    def _resolve(self, relative: str) -> Path | None:
        """Absolute path of a stored relative path, or None if it would escape images_dir."""
        candidate = (self.images_dir / relative).resolve()
        if not candidate.is_relative_to(self.images_dir):
            logger.warning("gallery path %r points outside %s; ignored", relative, self.images_dir)
            return None
        return candidate

    @staticmethod
    def _check_id(image_id: object) -> int:
        return check_image_id(image_id)

    @staticmethod
    def _missing(image_id: int) -> UserError:
        return UserError(f"Image #{image_id} is not in the gallery (it was deleted or pruned).")

    # ----------------------------------------------------------------------------------------
    # Rows <-> records

    def _insert(
        self,
        conn: sqlite3.Connection,
        record: ImageRecord,
        rel: str,
        text: str,
        owner: str | None = None,
    ) -> int:
        assert record.created_at is not None
        cursor = conn.execute(
            """
            INSERT INTO images (created_at, path, prompt, negative_prompt, seed, steps,
                guidance, sampler, width, height, model_name, model_hash, job_id, starred,
                parameters, version, owner)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
            """,
            (
                _utc_iso(record.created_at),
                rel,
                record.prompt,
                record.negative_prompt,
                record.seed,
                record.steps,
                record.guidance_scale,
                record.sampler,
                record.width,
                record.height,
                record.model_name,
                record.model_hash,
                record.job_id,
                int(record.starred),
                text,
                record.version,
                owner,
            ),
        )
        image_id = cursor.lastrowid
        assert image_id is not None
        conn.executemany(
            "INSERT INTO image_loras (image_id, name, scale, file_hash) VALUES (?, ?, ?, ?)",
            [(image_id, lora.name, lora.scale, lora.file_hash) for lora in record.loras],
        )
        return image_id

    def _records(self, conn: sqlite3.Connection, rows: Sequence[sqlite3.Row]) -> list[ImageRecord]:
        ids = [row["id"] for row in rows]
        loras: dict[int, list[LoraUse]] = {image_id: [] for image_id in ids}
        for start in range(0, len(ids), _IN_CHUNK):
            chunk = ids[start : start + _IN_CHUNK]
            marks = ",".join("?" * len(chunk))
            for lora in conn.execute(
                f"SELECT image_id, name, scale, file_hash FROM image_loras WHERE image_id IN ({marks}) ORDER BY rowid",
                chunk,
            ):
                loras[lora["image_id"]].append(
                    LoraUse(
                        name=lora["name"],
                        scale=lora["scale"],
                        file_hash=lora["file_hash"],
                    )
                )
        return [self._record(row, loras[row["id"]]) for row in rows]

    def _record(self, row: sqlite3.Row, loras: list[LoraUse]) -> ImageRecord:
        return _with_text_only_fields(self._columns_record(row, loras), row["parameters"] or "")

    def _columns_record(self, row: sqlite3.Row, loras: list[LoraUse]) -> ImageRecord:
        return ImageRecord(
            prompt=row["prompt"],
            negative_prompt=row["negative_prompt"],
            loras=loras,
            seed=row["seed"],
            steps=row["steps"],
            guidance_scale=row["guidance"],
            sampler=row["sampler"],
            width=row["width"],
            height=row["height"],
            model_name=row["model_name"],
            model_hash=row["model_hash"],
            job_id=row["job_id"],
            created_at=datetime.fromisoformat(row["created_at"]),
            id=row["id"],
            path=self.images_dir / row["path"],
            starred=bool(row["starred"]),
            version=row["version"] or "",
            img2img=_img2img_of(row["parameters"]),
            hires=_hires_of(row["parameters"]),
            controlnet=_controlnet_of(row["parameters"]),
        )

    # ----------------------------------------------------------------------------------------
    # Public API

    def add(
        self, record: ImageRecord, image: Image.Image, owner: str | None = None, attachments: dict | None = None
    ) -> ImageRecord:
        """Save ``image`` as a PNG with A1111 metadata, index it, then prune; return the stored
        record (with ``id``, absolute ``path`` and ``created_at``). ``owner``: the visitor who made it.
        ``attachments``: img2img's "init" image and "mask", saved beside it (``attachment_path``)."""
        created_at = _as_utc(record.created_at) if record.created_at else datetime.now(UTC)
        stored = replace(
            record,
            loras=[replace(lora) for lora in record.loras],
            created_at=created_at,
            width=record.width or image.width,
            height=record.height or image.height,
        )
        rel = self._new_relative_path(created_at, record.seed)
        text = format_parameters(stored)
        final = save_png_atomically(image, self.images_dir / rel, text)
        for kind, attached in (attachments or {}).items():
            with atomic_write(attachment_path(final, kind)) as handle:
                attached.save(handle, format="PNG")  # no parameters chunk: never imported as an image
        try:
            with self._write() as conn:
                image_id = self._insert(conn, stored, rel, text, owner)
        except BaseException:
            # No row, no file: otherwise reconcile would import an image the user never saw.
            final.unlink(missing_ok=True)
            for kind in ATTACHMENTS:
                attachment_path(final, kind).unlink(missing_ok=True)
            raise
        try:
            self.prune()
        except (sqlite3.Error, OSError):
            # The image is saved and indexed; failing the generation over retention would be
            # wrong. The next add prunes again.
            logger.exception("gallery prune after adding image #%d failed", image_id)
        return replace(stored, id=image_id, path=final)

    def list(
        self,
        query: str | None = None,
        lora: str | None = None,
        limit: int | None = 200,
        owner: str | None = None,
        *,
        starred: bool | None = None,
        offset: int = 0,
    ) -> builtins.list[ImageRecord]:
        """Newest first. ``query``: every word must appear in the prompt (any case);
        ``lora``: only images that used a LoRA of that name (any case); ``owner``: only that
        visitor's images (None: everyone's); ``starred``: only starred (True) or unstarred (False)
        images; ``offset``: skip that many of the newest (paging, with ``limit``)."""
        where: list[str] = []
        args: list[object] = []
        if owner is not None:
            where.append("owner = ?")
            args.append(owner)
        if starred is not None:
            where.append("starred = ?")
            args.append(int(bool(starred)))
        words = (query or "").casefold().split()
        if words:
            where.append("lorapg_contains_all(prompt, ?)")
            args.append(_WORD_SEPARATOR.join(words))
        if lora and lora.strip():
            where.append(
                "EXISTS (SELECT 1 FROM image_loras AS l WHERE l.image_id = images.id AND l.name = ? COLLATE NOCASE)"
            )
            args.append(lora.strip())
        sql = "SELECT * FROM images"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" {_NEWEST_FIRST}"
        if limit is not None or offset:
            # SQLite needs a LIMIT before an OFFSET; -1 is its "no limit".
            sql += " LIMIT ? OFFSET ?"
            args += [max(0, int(limit)) if limit is not None else -1, max(0, int(offset))]
        with self._read() as conn:
            rows = conn.execute(sql, args).fetchall()
            return self._records(conn, rows)

    def get(self, image_id: int, owner: str | None = None) -> ImageRecord:
        """The record for ``image_id``; UserError if it is not in the gallery (or, with ``owner``,
        not that visitor's: another visitor's image must look exactly like a missing one)."""
        image_id = self._check_id(image_id)
        mine, mine_args = _owner_filter(owner)
        with self._read() as conn:
            row = conn.execute(f"SELECT * FROM images WHERE id = ?{mine}", (image_id, *mine_args)).fetchone()
            if row is None:
                raise self._missing(image_id)
            return self._records(conn, [row])[0]

    def delete(self, image_id: int, owner: str | None = None) -> None:
        """Delete the image's file and row; UserError if it is not in the gallery (or not ``owner``'s)."""
        image_id = self._check_id(image_id)
        mine, mine_args = _owner_filter(owner)
        with self._write() as conn:
            row = conn.execute(f"SELECT path FROM images WHERE id = ?{mine}", (image_id, *mine_args)).fetchone()
            if row is None:
                raise self._missing(image_id)
            self._delete_rows(conn, [(image_id, row["path"])])

    def set_starred(self, image_id: int, starred: bool, owner: str | None = None) -> ImageRecord:
        """Star or unstar (only ``owner``'s image, when given). Unstarring does not prune at once
        (a misclick must not delete an image); the next ``add`` applies the retention."""
        return self._update_starred("?", (int(bool(starred)),), image_id, owner)

    def toggle_starred(self, image_id: int, owner: str | None = None) -> ImageRecord:
        """Flip the star in one statement: two clients toggling at once each flip it once (a
        read followed by a write would let both write the same value)."""
        return self._update_starred("NOT starred", (), image_id, owner)

    def _update_starred(
        self, value_sql: str, value_args: tuple[int, ...], image_id: object, owner: str | None
    ) -> ImageRecord:
        image_id = self._check_id(image_id)
        mine, mine_args = _owner_filter(owner)
        with self._write() as conn:
            row = conn.execute(
                f"UPDATE images SET starred = {value_sql} WHERE id = ?{mine} RETURNING *",
                (*value_args, image_id, *mine_args),
            ).fetchone()
            if row is None:
                raise self._missing(image_id)
            # Read inside the same transaction: the record returned is the state this call made.
            return self._records(conn, [row])[0]

    def prune(self) -> int:
        """Delete unstarred images beyond the newest ``keep`` of each owner (one visitor's
        images never push out another's); return how many went."""
        if self.keep == 0:
            return 0
        with self._write() as conn:
            victims = conn.execute(
                "SELECT id, path FROM (SELECT id, path, ROW_NUMBER() OVER "
                f"(PARTITION BY owner {_NEWEST_FIRST}) AS newest FROM images WHERE starred = 0) "
                "WHERE newest > ?",
                (self.keep,),
            ).fetchall()
            deleted = self._delete_rows(conn, [(row["id"], row["path"]) for row in victims])
        if deleted:
            logger.info("gallery pruned %d image(s) beyond the newest %d", deleted, self.keep)
        return deleted

    def _delete_rows(self, conn: sqlite3.Connection, items: Iterable[tuple[int, str]]) -> int:
        """Delete files, then the rows of the files that are gone (see the module docstring)."""
        gone: list[int] = []
        for image_id, rel in items:
            path = self._resolve(rel)
            if path is not None:
                try:
                    path.unlink(missing_ok=True)
                    for kind in ATTACHMENTS:
                        attachment_path(path, kind).unlink(missing_ok=True)
                except OSError as exc:
                    logger.warning("could not delete %s (%s); its gallery entry stays", path, exc)
                    continue
            gone.append(image_id)
        for start in range(0, len(gone), _IN_CHUNK):
            chunk = gone[start : start + _IN_CHUNK]
            marks = ",".join("?" * len(chunk))
            conn.execute(f"DELETE FROM image_loras WHERE image_id IN ({marks})", chunk)
            conn.execute(f"DELETE FROM images WHERE id IN ({marks})", chunk)
        return len(gone)

    # ----------------------------------------------------------------------------------------
    # Start-up repair

    def reconcile(self) -> builtins.list[str]:
        """Repair what a crash can leave behind; return one readable line per repair.

        Run it at start-up, before the gallery is served: it assumes no save is in progress.
        """
        lines = self._remove_temp_files()
        lines += self._drop_rows_without_files()
        lines += self._import_orphans()
        pruned = self.prune()
        if pruned:
            lines.append(f"Pruned {pruned} older image(s) to keep the newest {self.keep}.")
        for line in lines:
            logger.warning("gallery repair: %s", line)
        return lines

    def _remove_temp_files(self) -> builtins.list[str]:
        lines: list[str] = []
        for path in sorted(self.images_dir.rglob(".*")):
            if path.is_file() and is_temp_file(path):
                path.unlink(missing_ok=True)
                rel = path.relative_to(self.images_dir).as_posix()
                lines.append(f"Removed {rel}, left over from a save that was interrupted.")
        return lines

    def _drop_rows_without_files(self) -> builtins.list[str]:
        with self._write() as conn:
            rows = conn.execute("SELECT id, path FROM images ORDER BY id").fetchall()
            missing = []
            for row in rows:
                path = self._resolve(row["path"])
                if path is None or not path.is_file():
                    missing.append(row)
            self._delete_rows(conn, [(row["id"], row["path"]) for row in missing])
        return [f"Removed gallery entry #{row['id']}: its file {row['path']} is missing." for row in missing]

    def _import_orphans(self) -> builtins.list[str]:
        with self._read() as conn:
            known = {row["path"] for row in conn.execute("SELECT path FROM images")}
        found: list[tuple[str, ImageRecord, str]] = []
        for path in sorted(self.images_dir.rglob("*.png")):
            rel = path.relative_to(self.images_dir).as_posix()
            if rel in known or path.name.startswith(".") or is_attachment(path) or self._resolve(rel) is None:
                continue
            orphan = self._read_orphan(path)
            if orphan is not None:
                found.append((rel, *orphan))
        lines: list[str] = []
        if not found:
            return lines
        with self._write() as conn:
            for rel, record, text in found:
                if conn.execute("SELECT 1 FROM images WHERE path = ?", (rel,)).fetchone():
                    continue
                self._insert(conn, record, rel, text)
                lines.append(f"Imported {rel}: the image was on disk but not in the gallery.")
        return lines

    def _read_orphan(self, path: Path) -> tuple[ImageRecord, str] | None:
        """An orphan PNG's record and A1111 text; None (logged) if it cannot be imported."""
        try:
            # Header and text only: a huge orphan must not be decoded to be indexed.
            metadata = read_png_metadata(path)
        except (UserError, OSError) as exc:
            logger.warning("gallery: left %s alone: %s", path, exc)
            return None
        text, size = metadata.parameters, (metadata.width, metadata.height)
        if text is None:
            logger.info("gallery: left %s alone: it has no generation parameters", path)
            return None
        parsed = parse_parameters(text)
        for problem in parsed.problems:
            logger.info("gallery: %s: %s", path.name, problem)
        record = record_from_parsed(parsed)
        record.created_at = datetime.fromtimestamp(path.stat().st_mtime, UTC)
        record.width = record.width or size[0]
        record.height = record.height or size[1]
        return record, text
