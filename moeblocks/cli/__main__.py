"""``python -m moeblocks.cli`` (what ``torchrun ... -m moeblocks.cli train`` runs)."""

import sys

from moeblocks.cli import main

sys.exit(main())
