"""System: what this machine has, which backend `auto` picks and why, and what each backend can do."""

from __future__ import annotations

from tunelab.services.views import SystemReport


def doctor(*, measure: bool = True) -> SystemReport:
    """`tunelab doctor`'s facts; ``measure=False`` skips timing MLX's BLAS (for the dashboard)."""
    from tunelab.backends.hardware import doctor_report

    return SystemReport(**doctor_report(measure=measure))
