"""Test hook for tests/test_ray_workers.py, loaded by every Python process of the test's Ray cluster
(its folder is on the cluster's PYTHONPATH): where ``LORAPG_TEST_HOLD_DIR`` is set, a generation in
a worker actor stops after its first step while the file ``hold`` exists in that folder, writing
``held-<pid>`` first, so the test knows which process holds a job and can kill it there.

The engine module is patched when it is first imported (an import hook), so Ray's own processes that
never import it do not pay for torch.
"""

import importlib.abc
import os
import sys
import time
from pathlib import Path

HOLD_DIR = os.environ.get("LORAPG_TEST_HOLD_DIR")
TARGET = "lorapg.diffusion.engine"


def _hold(folder: Path) -> None:
    if not (folder / "hold").exists():
        return
    (folder / f"held-{os.getpid()}").write_text("held")
    while (folder / "hold").exists():  # the test removes it (or kills this process)
        time.sleep(0.05)


def _patch(module) -> None:
    engine_class = module.DiffusionEngine
    original = engine_class.generate
    folder = Path(HOLD_DIR)

    def generate(self, request, on_step=None, should_cancel=None):
        def step(done, total, preview=None):
            if done == 1:
                _hold(folder)
            if on_step is not None:
                on_step(done, total, preview)

        return original(self, request, on_step=step, should_cancel=should_cancel)

    engine_class.generate = generate


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        try:
            import importlib.util

            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        loader = spec.loader
        original_exec = loader.exec_module

        def exec_module(module):
            original_exec(module)
            _patch(module)

        loader.exec_module = exec_module
        return spec


if HOLD_DIR and "default_worker" in " ".join(sys.argv):
    sys.meta_path.insert(0, _PatchOnImport())
