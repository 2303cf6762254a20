"""``python -m lorapg`` entry point."""

import sys

from lorapg.quiet import quiet_third_party_imports

quiet_third_party_imports()

from lorapg.cli import main  # noqa: E402

sys.exit(main())
