"""``python -m lorapg`` entry point."""

import sys

from lorapg.quiet import quiet_third_party_imports

quiet_third_party_imports()

from lorapg.cli import main  # noqa: E402
from lorapg.process_exit import skip_the_final_collection  # noqa: E402

try:
    sys.exit(main())
finally:  # the command is done (its queue and threads closed): exit without collecting the whole heap
    skip_the_final_collection()
