"""A step of the export run in a plain interpreter of its own (tracing, and the build of a large source), so that
what it allocates is returned when it ends. Not multiprocessing: its spawn would run the caller's main script again
in the child. The request and the reply travel through pipes (pickled: both ends are this program), so no
temporary file can fill a disk. Nothing here loads PyTorch."""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import subprocess
import sys
import traceback

from llama_export.exporter.errors import UserError, one_line
from llama_export.exporter.signals import raise_if_terminated


def call_in_child(module: str, function: str, request: tuple, what: str):
    """`module.function(*request)` in a child, its return value back. The child has a session of its own, so a
    Ctrl-C reaches this process alone, which then ends the child; a child also ends when its parent does, however
    (so a tracing process inside a build process goes with it); a SIGTERM to this process is acted on within a
    second. The child's user errors are raised here as UserError with the same message, its OSErrors as OSError
    (the staging folder names a full disk); `what` names the step in other failures."""
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    command = [sys.executable, "-c", f"from {__name__} import serve; from {module} import {function}; "
               f"serve({function}, {what!r})"]
    child = subprocess.Popen(command, env=environment, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             start_new_session=True, preexec_fn=_end_with_parent)
    try:
        reply = _reply(child, pickle.dumps(request))
    except BaseException:  # Ctrl-C, or SIGTERM seen while waiting
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        raise
    if not reply:
        killed = -child.returncode if child.returncode < 0 else None
        cause = f"was killed by signal {killed}" if killed else f"ended with exit code {child.returncode}"
        hint = ", most likely by the system for lack of memory (the export's estimate is printed at its start)" \
            if killed == signal.SIGKILL else ""
        raise UserError(f"{what}: its process {cause}{hint}; nothing was written")
    kind, payload = pickle.loads(reply)  # written by serve below, never by a user
    if kind == "user-error":
        raise UserError(payload)
    if kind == "os-error":
        raise OSError(*payload)
    if kind == "internal-error":
        raise RuntimeError(payload)
    return payload


def _end_with_parent() -> None:
    """In the child before it starts: the kernel sends it SIGKILL when its parent ends (Linux; elsewhere the
    parent's own handling of Ctrl-C and SIGTERM remains)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _reply(child: subprocess.Popen, request: bytes) -> bytes:
    pending = request
    while True:
        try:
            reply, _ = child.communicate(pending, timeout=1)
            return reply
        except subprocess.TimeoutExpired:
            pending = None  # sent already
            raise_if_terminated()


def serve(function, what: str) -> None:
    """The child's side: the request read from stdin, `function` called, and its result written to stdout, which
    the step's own prints must not reach (they go to stderr); a failure's message is sent instead of a
    traceback being printed."""
    from llama_export.runtimes import PackageError
    from llama_export.targets import TargetError

    reply = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    try:
        result = ("done", function(*pickle.load(sys.stdin.buffer)))
    except (UserError, TargetError, PackageError) as exc:
        result = ("user-error", one_line(exc))
    except OSError as exc:
        result = ("os-error", (exc.errno, exc.strerror or str(exc), exc.filename))
    except BaseException as exc:
        summary = traceback.format_exception_only(exc)[-1].strip().replace("\n", " ")
        result = ("internal-error", f"{what} failed in its process: {summary}\n" + traceback.format_exc())
    with contextlib.suppress(BrokenPipeError), reply:  # a parent that is gone wants no reply
        reply.write(pickle.dumps(result))
