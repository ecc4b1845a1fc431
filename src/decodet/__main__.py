"""``python -m decodet`` (also what ``torchrun -m decodet train ...`` runs)."""

import sys

from decodet.cli import main

sys.exit(main())
