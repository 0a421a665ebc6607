"""`python -m flaxformer_lite ...` is `flaxformer-lite ...`."""

import sys

from flaxformer_lite.cli import main

sys.exit(main())
