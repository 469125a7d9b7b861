"""SIGTERM during an export: remembered by the handler and raised as Terminated (a KeyboardInterrupt, so the
staging folder and lock are cleaned up) at the next progress line or weight written, and before the package is
swapped into place. The handler does not raise itself: an exception raised at an arbitrary point can be dropped
(inside a weakref callback) or turned into another error by library code (seen with numpy)."""

from __future__ import annotations

import signal


class Terminated(KeyboardInterrupt):
    """The process was sent SIGTERM."""


_requested = False


def _on_sigterm(signum, frame):
    global _requested
    _requested = True


def handle_sigterm() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)


def raise_if_terminated() -> None:
    if _requested:
        raise Terminated()
