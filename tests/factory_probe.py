"""A program for tests/test_process_factory.py: prints what a forked run must get exactly as a fresh one."""

import os
import sys

print("argv", sys.argv[1:])
print("cwd", os.getcwd())
print("LORAPG_PROBE", os.environ.get("LORAPG_PROBE"))
print("gradio", "gradio" in sys.modules)
print("error: the probe's own message", file=sys.stderr)
sys.exit(3)
