"""``python -m deqntk_dist.cli``: the ``deqntk`` console script."""

import sys

from . import main

sys.exit(main())
