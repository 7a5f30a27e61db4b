"""``python -m rearec``: the same command line as the ``rearec`` console script."""
import sys

from rearec.cli import main

sys.exit(main())
