"""``python -m ame_kernels CONFIG.yaml OUT_DIR`` (and under torchrun): the ame-merge CLI."""

import sys

from .cli import main

sys.exit(main())
