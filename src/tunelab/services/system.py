"""System: what this machine has, which backend `auto` picks and why, what each backend can do, and which of
tunelab's extras are installed (with the command that adds each missing one)."""

from __future__ import annotations

import importlib.metadata
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tunelab.services.views import SystemReport

# Extras for developing tunelab itself, and the one that is every other: not a user's choice to report.
_NOT_REPORTED = {"dev", "all"}


def doctor(*, measure: bool = True) -> SystemReport:
    """`tunelab doctor`'s facts; ``measure=False`` skips timing MLX's BLAS (for the dashboard)."""
    from tunelab.backends.hardware import doctor_report

    return SystemReport(**doctor_report(measure=measure))


@dataclass(frozen=True)
class ExtraStatus:
    """One of tunelab's extras: installed or not, what is missing, and the command that adds it."""

    name: str
    present: bool
    missing: list[str]
    command: str

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (what `tunelab doctor --json` prints under ``extras``)."""
        return asdict(self)


def extras() -> list[ExtraStatus]:
    """Each extra with the packages it needs on this platform that are not installed, and how to add them.

    The extras are read from the source tree's pyproject.toml when tunelab runs from one (an editable
    install's metadata is as old as the last ``pip install -e``), else from the installed metadata.
    """
    from packaging.requirements import Requirement

    source = _editable_source()
    declared = _declared_extras(source)
    statuses = []
    for name in declared:
        if name in _NOT_REPORTED:
            continue
        missing = [req.name for req in _requirements(name, declared, Requirement) if not _installed(req.name)]
        where = f'-e "{source}[{name}]"' if source is not None else f'"tunelab[{name}]"'
        statuses.append(ExtraStatus(name, not missing, sorted(set(missing)), f"pip install {where}"))
    return statuses


def _requirements(extra: str, declared: dict[str, list[str]], requirement: Any, seen: frozenset = frozenset()) -> list:
    """The requirements of ``extra`` that apply on this platform, with ``tunelab[...]`` ones expanded."""
    found = []
    for text in declared.get(extra, []):
        req = requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        if req.name == "tunelab":
            for sub in sorted(req.extras - seen - {extra}):
                found += _requirements(sub, declared, requirement, seen | {extra})
        else:
            found.append(req)
    return found


def _installed(name: str) -> bool:
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _editable_source() -> Path | None:
    """The source tree tunelab runs from (an editable install, or ``src`` on the path), when it has one."""
    import tunelab

    root = Path(tunelab.__file__).resolve().parents[2]
    pyproject = root / "pyproject.toml"
    if Path(tunelab.__file__).resolve().parents[1].name != "src" or not pyproject.is_file():
        return None
    return root if 'name = "tunelab"' in pyproject.read_text(encoding="utf-8") else None


def _declared_extras(source: Path | None) -> dict[str, list[str]]:
    """Extra name -> its requirement strings, from pyproject.toml (editable, Python 3.11+) or the metadata."""
    if source is not None and sys.version_info >= (3, 11):
        import tomllib

        project = tomllib.loads((source / "pyproject.toml").read_text(encoding="utf-8")).get("project", {})
        return dict(project.get("optional-dependencies", {}))
    try:
        meta = importlib.metadata.metadata("tunelab")
    except importlib.metadata.PackageNotFoundError:
        return {}
    from packaging.requirements import Requirement

    declared: dict[str, list[str]] = {name: [] for name in meta.get_all("Provides-Extra") or []}
    for text in meta.get_all("Requires-Dist") or []:
        req = Requirement(text)
        for name in declared:
            if req.marker is not None and req.marker.evaluate({"extra": name}) and "extra" in str(req.marker):
                req_text = str(req).split(";")[0]
                declared[name].append(req_text)
    return declared
