"""Completion notifications: a JSON POST to ``--notify-webhook`` when a training run ends.

Delivery happens on a thread of its own, so a slow or dead receiver never holds up training or the
GPU queue. Each notification is tried a few times with a growing pause; when every try fails, one
warning is logged for that run and nothing else changes. The URL may carry a token (Slack, Discord,
ntfy and most chat webhooks put the secret in the path or the query), so logs name its host only.
User info in the URL (``https://user:pw@host/hook``) is sent as a Basic Authorization header, and
redirects are not followed, so those credentials never go to another host.

Never imports gradio; stdlib only (``urllib``, as the prompt tools' OpenAI client does).
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

from lorapg.errors import UserError

log = logging.getLogger(__name__)

TRAINING_FINISHED = "training.finished"
SETTING = "notify_webhook (--notify-webhook, LORAPG_NOTIFY_WEBHOOK)"
_SCHEMES = ("http", "https")


def check_webhook_url(url: str) -> str:
    """The URL, stripped, if it is an http(s) URL with a host; otherwise a UserError naming the setting.

    The message never repeats the URL: it may hold a token, and errors end up in logs and terminals.
    """
    url = url.strip()
    if any(char.isspace() or unicodedata.category(char) == "Cc" for char in url):
        # http.client refuses such a URL on every try, and its error repeats the whole URL.
        raise UserError(
            f"Setting {SETTING} contains a space or control character; percent-encode it (a space is %20) or remove it."
        )
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # urllib's text may repeat the host with its user info: not shown
        raise UserError(
            f"Setting {SETTING} is not a valid URL (check the brackets and characters of its host); "
            "give an http:// or https:// URL."
        ) from None
    try:
        parts.port  # noqa: B018  (a non-numeric port raises only when read)
    except ValueError:
        raise UserError(
            f"Setting {SETTING} is not a valid URL (its port must be a number from 0 to 65535); "
            "give an http:// or https:// URL."
        ) from None
    if parts.scheme.lower() not in _SCHEMES:
        scheme = f"{parts.scheme}://" if parts.scheme else "no scheme"
        raise UserError(
            f"Setting {SETTING} must be an http:// or https:// URL; it has {scheme[:20]}. "
            "Give the receiver's full address, e.g. https://example.com/hooks/lorapg."
        )
    if not parts.hostname:
        raise UserError(f"Setting {SETTING} has no host; give a full URL such as https://example.com/hooks/lorapg.")
    return url


def url_host(url: str) -> str:
    """What logs may say about a webhook: its host and port, never user info, path or query."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "?"
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    return f"{host}:{parts.port}" if parts.port else host


def split_credentials(url: str) -> tuple[str, str | None]:
    """(the URL without user info, its Basic Authorization header or None).

    urllib would take ``user:pw@host`` for the host name, so every delivery would fail.
    """
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url, None
    user = urllib.parse.unquote(parts.username or "")
    password = urllib.parse.unquote(parts.password or "")
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    bare = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    return bare, f"Basic {token}"


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A 3xx answer fails the try: urllib would resend the Authorization header to wherever it points,
    and it turns a redirected POST into a GET without the body, which "succeeds" with nothing delivered."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class WebhookNotifier:
    """POSTs JSON events to one URL, each from a background thread, with retries.

    ``attempts`` tries per event; the pause after try ``n`` (from 0) is ``backoff * 2**n`` seconds.
    A 4xx answer other than 408/429 is not retried: asking again would get the same answer.
    """

    def __init__(self, url: str, *, timeout: float = 10.0, attempts: int = 3, backoff: float = 1.0):
        checked = check_webhook_url(url)
        self.host = url_host(checked)
        self.url, self._authorization = split_credentials(checked)
        # Kept to leave out of any message a try produces (the header itself is never logged).
        parts = urllib.parse.urlsplit(checked)
        self._credentials = [value for value in (parts.username, parts.password) if value]
        self._opener = urllib.request.build_opener(_NoRedirects)
        self.timeout = timeout
        self.attempts = max(1, attempts)
        self.backoff = backoff
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()

    def send(self, payload: dict[str, Any]) -> threading.Thread:
        """Deliver ``payload`` in the background; returns the delivering thread."""
        return self.send_when(lambda: None, lambda: payload)

    def send_when(self, ready: Callable[[], Any], payload: Callable[[], dict[str, Any]]) -> threading.Thread:
        """Wait on ``ready()`` (e.g. a job's ``wait``) in the background, then deliver ``payload()``.

        The payload is built after ``ready`` returns, so it describes the outcome, not the start.
        """

        def deliver() -> None:
            try:
                ready()
                self._post(payload())
            except Exception:  # a notification must never take anything down with it
                log.warning("notification to %s not sent", self.host, exc_info=True)
            finally:
                with self._lock:
                    self._threads.discard(threading.current_thread())

        thread = threading.Thread(target=deliver, name="webhook", daemon=True)
        with self._lock:
            self._threads.add(thread)
        thread.start()
        return thread

    def close(self, timeout: float | None = 30.0) -> bool:
        """Wait (up to ``timeout`` seconds in all) for pending deliveries; True when none is left.

        A CLI calls this before it exits: delivery threads are daemons, and a notification still
        being sent when the interpreter exits would be lost without a word.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                pending = next(iter(self._threads), None)
            if pending is None:
                return True
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                log.warning("a notification to %s was still being sent at exit; it is dropped", self.host)
                return False
            pending.join(remaining)

    def _post(self, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        problem = ""
        for attempt in range(self.attempts):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            problem, retry = self._try_once(body)
            if not problem:
                log.info("notification %s sent to %s", payload.get("event", ""), self.host)
                return
            log.debug("notification to %s, try %d of %d: %s", self.host, attempt + 1, self.attempts, problem)
            if not retry:
                break
        # One warning per event, whatever happened on the way; the reason, never the URL.
        log.warning(
            "could not notify %s that %s %s ended (%s); check --notify-webhook",
            self.host,
            payload.get("event", "an event"),
            payload.get("run", ""),
            problem,
        )

    def _try_once(self, body: bytes) -> tuple[str, bool]:
        """One POST: ("", _) when the receiver accepted it, else (reason, whether to try again).

        Never raises: every reason is checked against the URL's secret parts before it may be logged.
        """
        headers = {"Content-Type": "application/json", "User-Agent": "lorapg-notify"}
        if self._authorization:
            headers["Authorization"] = self._authorization
        try:
            request = urllib.request.Request(self.url, data=body, method="POST", headers=headers)
            with self._opener.open(request, timeout=self.timeout) as response:
                response.read(1024)
            return "", False
        except urllib.error.HTTPError as exc:
            # exc.reason, not str(exc): urllib's text is fine, but the URL must stay out of logs.
            hint = " (redirects are not followed: give the final URL)" if 300 <= exc.code < 400 else ""
            reason = self._reason(f"HTTP {exc.code}", exc.reason) + hint
            return reason, exc.code >= 500 or exc.code in (408, 429)
        except urllib.error.URLError as exc:
            return self._reason("unreachable", exc.reason), True
        except (OSError, ValueError) as exc:  # timeouts, resets; ValueError's text may hold the URL
            return self._reason(type(exc).__name__, exc), True
        except Exception as exc:  # http.client's (a malformed answer, InvalidURL repeating the URL), any other
            return f"{type(exc).__name__} (details left out: they may repeat the URL)", True

    def _reason(self, label: str, detail: object) -> str:
        """``label: detail``, or ``label`` alone when the detail repeats the URL's path, query or credentials."""
        text = str(detail)
        parts = urllib.parse.urlsplit(self.url)
        secrets = [parts.path if parts.path != "/" else "", parts.query, parts.fragment, *self._credentials]
        secrets += [urllib.parse.unquote(secret) for secret in secrets]
        if any(secret and secret in text for secret in secrets):
            return f"{label} (details left out: they repeat part of the URL)"
        return f"{label}: {text}" if text else label


def webhook_from_settings(settings: Any) -> WebhookNotifier | None:
    """The notifier ``settings.notify_webhook`` asks for, or None when it is empty; checked here, at start-up."""
    url = (getattr(settings, "notify_webhook", "") or "").strip()
    if not url:
        return None
    notifier = WebhookNotifier(url)
    log.info("training runs notify a webhook on %s when they end", notifier.host)
    return notifier


def training_finished(
    *,
    run: str,
    job_id: str,
    status: str,
    lora_path: str | None,
    duration_seconds: float | None,
    final_loss: float | None,
    error: str | None,
) -> dict[str, Any]:
    """The JSON body sent when a training run ends; ``status`` is done, error or cancelled."""
    return {
        "event": TRAINING_FINISHED,
        "run": run,
        "job_id": job_id,
        "status": status,
        "lora_path": lora_path,
        "duration_seconds": None if duration_seconds is None else round(duration_seconds, 3),
        "final_loss": final_loss,
        "error": error,
    }
