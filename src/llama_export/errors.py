"""The base of every error llama-export reports as the user's to fix (a leaf module: any room may import it).
The exporter's UserError, the runtimes' PackageError and the targets' TargetError derive from it, so a program
using the Python API catches them all as LlamaExportError."""


class LlamaExportError(Exception):
    """A problem with the input, a package or the environment; its message is one line saying what to change."""
