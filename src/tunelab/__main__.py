"""`python -m tunelab` is the same as the `tunelab` command."""

from tunelab.cli.main import main

main()
