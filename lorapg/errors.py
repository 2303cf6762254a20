"""The one error type services raise for problems a user can fix.

The UI shows it as ``gr.Error``, the CLI prints its message on one line and exits non-zero, and the
API returns it with a 4xx code. Anything else escaping a service is a bug, not a user mistake.
"""


class UserError(Exception):
    """A problem with the user's input or files; the message says what to change."""
