"""The one error type services raise for problems a user can fix.

The UI shows it as ``gr.Error``, the CLI prints its message on one line and exits non-zero, and the
API returns it with a 4xx code. Anything else escaping a service is a bug, not a user mistake.
"""


class UserError(Exception):
    """A problem with the user's input or files; the message says what to change."""


def shorten(value: object, limit: int = 80) -> str:
    """``repr``-free text of ``value`` for a message or a log line, cut to ``limit`` characters.

    Users paste anything into a field: a 10 MB "model id" must not come back in full in the error,
    the log and the browser. The cut keeps the start (what the user recognises) and says how long
    the whole was.
    """
    text = str(value)
    if len(text) <= limit:
        return text
    return f"{text[: max(limit - 1, 0)]}… ({len(text)} characters)"


MAX_REF_CHARS = 4096  # a path or hub id longer than any file system allows (PATH_MAX) is a mistake or abuse


def check_ref_length(value: str, field: str) -> str:
    """Refuse an id, path or reference longer than ``MAX_REF_CHARS`` before any work is done with it."""
    if len(value) > MAX_REF_CHARS:
        raise UserError(
            f"{field} is {len(value)} characters long; it can be at most {MAX_REF_CHARS}. "
            f"Check what was pasted: {shorten(value, 40)}"
        )
    return value
