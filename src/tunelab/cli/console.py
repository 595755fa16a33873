"""Shared Rich consoles (stdout for results, stderr for progress and errors)."""

from __future__ import annotations

from rich.console import Console

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)
