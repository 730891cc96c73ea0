"""`python -m pretrain STAGE ...` / `torchrun --nproc-per-node N -m pretrain STAGE ...`."""

import sys

from pretrain.cli import main

if __name__ == "__main__":
    sys.exit(main())
