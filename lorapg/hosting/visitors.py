"""Who is asking: a stable id for each visitor of a public app, without accounts.

The browser keeps a random id (the UI stores it in Gradio's BrowserState, i.e. localStorage), so a
reload or a second tab in the same browser is the same visitor; behind a login (``--auth``) the user
name is the visitor in any browser; an API client (gradio_client) keeps no storage and is one visitor
per session. A page registers its browser id for its session when it opens; every later event of
that page carries the same session, which names the visitor.

Locally (visitors not kept apart) everything belongs to no one (``None``): one shared gallery,
one working prompt, as before.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import threading
import uuid
from collections import OrderedDict
from pathlib import Path

log = logging.getLogger(__name__)

_BROWSER_ID = re.compile(r"[0-9a-f]{32}")
MAX_SESSIONS = 10_000  # open pages remembered; the oldest are forgotten first (they fall back to their session)


def visitor_key(owner: str) -> str:
    """A file-name-safe key for ``owner`` (its folders and files must not reveal or escape it)."""
    return hashlib.sha256(owner.encode("utf-8")).hexdigest()[:24]


def browser_secret(path: Path) -> str | None:
    """The key that encrypts the visitor id each browser keeps, created once and kept at ``path``.

    Kept beside the gallery (a mounted bucket keeps both): with a new key after a restart every
    visitor would become a stranger to their own images. None (a key per run) when it cannot be kept.
    """
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot read %s (%s); visitors are recognised only until the app restarts", path, exc)
        return None
    key = secrets.token_urlsafe(24)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8") as handle:
            handle.write(key)
    except FileExistsError:  # another process made it first: use theirs
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        log.warning("cannot write %s (%s); visitors are recognised only until the app restarts", path, exc)
        return None
    return key


class Visitors:
    def __init__(self, private: bool, max_sessions: int = MAX_SESSIONS):
        self.private = private
        self._sessions: OrderedDict[str, str] = OrderedDict()
        self._max_sessions = max_sessions
        self._lock = threading.Lock()

    def open_page(self, session: str | None, browser_id: str | None, username: str | None = None) -> str:
        """Register the page of ``session`` for the browser holding ``browser_id``.

        Returns the browser id to keep: a fresh random one when the browser had none (or sent
        something that is not one of ours: the stored value is the visitor's to change).
        """
        if not (isinstance(browser_id, str) and _BROWSER_ID.fullmatch(browser_id)):
            browser_id = uuid.uuid4().hex
        if self.private and session:
            owner = f"user:{username}" if username else f"browser:{browser_id}"
            with self._lock:
                self._sessions[session] = owner
                self._sessions.move_to_end(session)
                while len(self._sessions) > self._max_sessions:
                    self._sessions.popitem(last=False)
        return browser_id

    def owner(self, session: str | None, username: str | None = None) -> str | None:
        """The visitor behind a request; None when visitors are not kept apart."""
        if not self.private:
            return None
        if username:
            return f"user:{username}"
        with self._lock:
            known = self._sessions.get(session or "")
        if known is not None:
            return known
        # An API client, or a page opened before the app restarted: its session is all we know.
        return f"session:{session or 'none'}"
