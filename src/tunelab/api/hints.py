"""Errors say what to change in words for the interface that shows them; these are the API's words.

Services raise one error for every interface, and a few carry the CLI's advice (an ``a.b=c`` override,
a `tunelab ... list` command). An API client can do neither, so the error handler swaps such advice for
what it can do: fix a key in the request's ``config`` object, call a listing route.
"""

from __future__ import annotations

import re

_REWRITES = [
    (re.compile(r"fix the YAML or pass an override such as [\w.]+=\S+"),
     'fix that key in the request\'s "config" object (it holds what a YAML config file holds)'),
    (re.compile(r"`tunelab runs list` shows the runs"), "GET /v1/runs lists them"),
    (re.compile(r"`tunelab jobs list` shows the jobs"), "GET /v1/jobs lists them"),
    (re.compile(r"`tunelab init` writes one to start from"), "send the config itself in the request"),
]  # fmt: skip


def for_api(text: str) -> str:
    """``text`` (an error's message or hint) with CLI-only advice put as an API client can follow it."""
    for pattern, replacement in _REWRITES:
        text = pattern.sub(replacement, text)
    return text
