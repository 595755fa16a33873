"""The run registry: which runs exist, what they trained on, what they logged and produced.

Open it with :func:`open_registry` (migrates the DB on first use in a process),
work inside :func:`session_scope`, and query only through :mod:`.repo`.
"""

from tunelab.registry.db import open_registry, session_scope

__all__ = ["open_registry", "session_scope"]
