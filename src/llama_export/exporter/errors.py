"""The one exception type the CLI turns into a one-line message and a non-zero exit."""

from llama_export.errors import LlamaExportError


def one_line(text: str) -> str:
    """Text from a file (a tensor or key name) may hold newlines or control characters: shown escaped, so an
    error stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


class UserError(LlamaExportError):
    """A problem with the user's input or environment, reported without a traceback."""

    def __init__(self, message: str):
        super().__init__(one_line(message))
