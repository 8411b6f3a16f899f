"""``python -m diloco`` (what ``torchrun -m diloco`` runs)."""

import sys

from diloco.cli import main

sys.exit(main())
