"""llama-export: sources, tracing, the export pipeline and the command line."""

__version__ = "0.1.0"
