"""`python -m ggq ...` runs the command line (same as the `ggq` script)."""
from ggq.cli import main

main(prog_name="ggq")
