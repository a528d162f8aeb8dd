import sys

from analysis.lab.cli import main

sys.exit(main())
