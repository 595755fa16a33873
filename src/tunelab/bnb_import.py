"""bitsandbytes imported without reaching the Hugging Face Hub.

On a CPU with AVX-512 BF16, importing bitsandbytes (0.50) asks the ``kernels``
package for a CPU kernel from the Hub: a request to the Hub at import, and a
download where the Hub is reachable, or a warning line in the middle of the run
where it is not.  PEFT imports bitsandbytes, when installed, for every LoRA
adapter it creates (and tunelab's ``all`` extra installs it, for QLoRA), so a
plain LoRA run on such a CPU reached the Hub, which a local-first tool must not
do unasked.  :func:`install` puts a finder in front of the import system that
runs the first import of bitsandbytes with the Hub offline: a kernel already
in the local cache still loads, nothing is fetched, and the notices about the
kernel it did not fetch are not printed.  Nothing is imported until something
imports bitsandbytes.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import logging
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType

# The loggers of the kernel fetch bitsandbytes attempts at import, and of the package it asks.
_NOTICES = ("bitsandbytes.backends.cpu.ops", "kernels")


@contextmanager
def hub_offline() -> Iterator[None]:
    """The Hub offline and the kernel fetch's notices silenced, for this block only."""
    try:
        import huggingface_hub.constants as hub
    except ImportError:  # then nothing reaches the Hub through it
        yield
        return
    loggers = [logging.getLogger(name) for name in _NOTICES]
    before = hub.HF_HUB_OFFLINE, [logger.level for logger in loggers]
    hub.HF_HUB_OFFLINE = True  # read at call time by the kernels package
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = before[0]
        for logger, level in zip(loggers, before[1], strict=True):
            logger.setLevel(level)


class _Loader(importlib.abc.Loader):
    """bitsandbytes' own loader, its module run inside :func:`hub_offline`."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self.inner  # what the module would have had (resources, reloads)
        if module.__spec__ is not None:
            module.__spec__.loader = self.inner
        with hub_offline():
            self.inner.exec_module(module)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds bitsandbytes as the import system would, with :class:`_Loader` around its loader.

    It stays in place until bitsandbytes is imported: availability checks (transformers', PEFT's) look
    the package up with ``find_spec`` long before anything imports it, and each must leave the finder
    for the import itself.  Once imported, the module is found in ``sys.modules`` before any finder.
    """

    def __init__(self) -> None:
        self.busy = threading.local()

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "bitsandbytes" or getattr(self.busy, "on", False):
            return None
        self.busy.on = True  # the lookup below asks every finder again, this one included
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self.busy.on = False
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Have the process's first import of bitsandbytes run with the Hub offline (a no-op once imported)."""
    if "bitsandbytes" in sys.modules or any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _Finder())
