"""Exporters: merge a run's adapter, write hf / mlx / gguf / ollama / onnx / coreml, verify in each runtime.

Nothing heavy is imported here; each target module imports its runtime inside functions.
"""

from __future__ import annotations

from tunelab.export.pipeline import TARGETS, ExportResult, ExportSource, export_model

__all__ = ["TARGETS", "ExportResult", "ExportSource", "export_model"]
