"""``python -m lorapg`` that also says which gloo threads are still alive once the run's process group ended.

The 2-process training tests run under it (``accelerate launch -m tests.gloo_probe train CONFIG``). A
process group whose last reference is a DDP reducer is destroyed (its gloo threads joined) wherever the
reducer happens to be freed, which could hang (see ``lorapg.training.distributed.end_process_group``);
ended in order, no gloo thread is left when ``Accelerator.end_training`` returns.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from accelerate import Accelerator

from lorapg.cli import main

PREFIX = "gloo threads after end_training:"


def gloo_threads() -> list[str]:
    tasks = Path("/proc/self/task")
    names = ((tasks / task / "comm").read_text().strip() for task in os.listdir(tasks))
    return sorted(name for name in names if "gloo" in name)


def _probing(end_training):
    def wrapper(self):
        end_training(self)
        # One write of one short line: both processes share stderr, and a pipe keeps a write of under
        # PIPE_BUF bytes whole, so the two probes' lines never interleave (print may write in pieces).
        sys.stderr.flush()
        os.write(sys.stderr.fileno(), f"\n{PREFIX} {gloo_threads()}\n".encode())

    return wrapper


if __name__ == "__main__":
    Accelerator.end_training = _probing(Accelerator.end_training)
    sys.exit(main(sys.argv[1:]))
