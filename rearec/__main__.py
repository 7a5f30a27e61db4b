"""``python -m rearec``: the same command line as the ``rearec`` console script."""
from rearec.cli import run_and_exit

run_and_exit()
