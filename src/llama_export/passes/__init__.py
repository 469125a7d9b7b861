"""Graph-to-graph passes over onnx-ir models. Each pass reports how many sites it rewrote."""

from llama_export.passes.base import GraphPass, PassReport, format_report, run_passes

__all__ = ["GraphPass", "PassReport", "run_passes", "format_report"]
