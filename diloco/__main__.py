"""``python -m diloco`` (what ``torchrun -m diloco`` runs)."""

import sys

from diloco.cli import main

if __name__ == "__main__":
    sys.exit(main())
