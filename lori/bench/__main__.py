"""``python -m lori.bench``: the same as ``lori bench``."""

import sys

from lori.bench import main

sys.exit(main())
