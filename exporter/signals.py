"""SIGTERM unwound like Ctrl-C, so staging folders and locks are cleaned up. Python drops an exception raised
while a weakref callback or __del__ runs ("Exception ignored in ..."), so the request is also remembered and
raised again at the next progress line and before a package is swapped into place."""

from __future__ import annotations

import signal


class Terminated(KeyboardInterrupt):
    """The process was sent SIGTERM."""


_requested = False


def _on_sigterm(signum, frame):
    global _requested
    _requested = True
    raise Terminated()


def handle_sigterm() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)


def raise_if_terminated() -> None:
    if _requested:
        raise Terminated()
