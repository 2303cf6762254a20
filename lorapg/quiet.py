"""Silence third-party import-time notices that are not for our users.

Must run before anything imports transformers or bitsandbytes, so the entry points (app.py,
``python -m lorapg``) call it first; it imports nothing heavy itself.
"""

import logging
import os


def quiet_third_party_imports() -> None:
    # transformers prints notices such as "requires torchvision (not installed)" at import.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # bitsandbytes warns at import that an optional faster CPU kernel package is missing; the
    # built-in kernel works.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
