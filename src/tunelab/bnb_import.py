"""bitsandbytes imported without reaching the Hugging Face Hub.

On a CPU with AVX-512 BF16, importing bitsandbytes (0.50) asks the ``kernels``
package for a CPU kernel from the Hub: a request to the Hub at import, and a
download of code where the Hub is reachable, or a warning line in the middle of
the run where it is not.  PEFT imports bitsandbytes, when installed, for every
LoRA adapter it creates (and tunelab's ``all`` extra installs it, for QLoRA), so
a plain LoRA run on such a CPU reached the Hub, which a local-first tool must
not do unasked.  :func:`install` puts a finder in front of the import system
that runs the import of bitsandbytes with ``kernels.get_kernel`` refusing
(bitsandbytes then keeps its own CPU kernels, as it does wherever the fetch
fails) and the notices about it silenced.  Only that call is swapped, for that
import only, so another thread's downloads meanwhile are untouched; nothing is
imported until something imports bitsandbytes.
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


class HubKernelRefused(RuntimeError):
    """What ``kernels.get_kernel`` raises while bitsandbytes is imported (bitsandbytes passes over it)."""


def _refuse(repo_id: str, *_: object, **__: object) -> None:
    raise HubKernelRefused(f"tunelab does not fetch {repo_id} from the Hugging Face Hub")


@contextmanager
def no_hub_kernels() -> Iterator[None]:
    """``kernels.get_kernel`` refusing, and the notices of a refused fetch silenced, for this block only."""
    loggers = [logging.getLogger(name) for name in _NOTICES]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        import kernels
    except ImportError:  # bitsandbytes' own import of it fails the same way, and fetches nothing
        kernels = None
    real = getattr(kernels, "get_kernel", None)
    if real is not None:
        kernels.get_kernel = _refuse  # bitsandbytes imports the name from the package when it asks
    try:
        yield
    finally:
        if real is not None:
            kernels.get_kernel = real
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


class _Loader(importlib.abc.Loader):
    """bitsandbytes' own loader, its module run inside :func:`no_hub_kernels`."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self.inner  # what the module would have had (resources, reloads)
        if module.__spec__ is not None:
            module.__spec__.loader = self.inner
        with no_hub_kernels():
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
    """Have the process's import of bitsandbytes fetch no kernel from the Hub (a no-op once imported)."""
    if "bitsandbytes" in sys.modules or any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _Finder())
