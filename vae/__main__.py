"""``python -m vae <stage>`` is ``vae <stage>``."""

import sys

from vae.cli import main

sys.exit(main())
