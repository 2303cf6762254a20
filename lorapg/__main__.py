"""``python -m lorapg`` entry point."""

import os
import sys

# transformers prints import-time notices (e.g. about torchvision) that are not for our users;
# the variable must be set before anything imports transformers.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from lorapg.cli import main  # noqa: E402

sys.exit(main())
