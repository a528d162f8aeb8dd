"""`python -m train CONFIG ...` trains (train.cli); `python -m train export ARM_DIR ...` exports (train.export)."""
from __future__ import annotations

import sys

if sys.argv[1:2] == ["export"]:
  from train.export import main
  sys.exit(main(sys.argv[2:]))

from train.cli import main

sys.exit(main())
