"""`python -m labelgw.workers`: a worker process (labelgw.workers.worker), started by the supervisor."""

import sys

from labelgw.workers.worker import main

sys.exit(main(sys.argv[1:]))
