"""The `tunelab` command: thin Typer adapters over `tunelab.services`."""
