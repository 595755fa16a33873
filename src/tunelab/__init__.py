"""tunelab: fine-tune open LLMs on your own data, locally, with one config and one command.

The public Python API mirrors the CLI; importing it loads neither torch nor mlx.
"""

from __future__ import annotations

from typing import Any

from tunelab import bnb_import

bnb_import.install()  # bitsandbytes, when something imports it, does not reach the Hub (bnb_import.py says why)

__version__ = "0.1.0"

__all__ = ["__version__", "list_runs", "load_config", "resume_run", "show_run", "start_run"]


def __getattr__(name: str) -> Any:
    # Lazy re-exports keep `import tunelab` (and `tunelab --help`) fast.
    if name == "load_config":
        from tunelab.config.load import load_config

        return load_config
    if name in {"start_run", "resume_run", "list_runs", "show_run"}:
        from tunelab import services

        return getattr(services, name)
    raise AttributeError(f"module 'tunelab' has no attribute {name!r}")
