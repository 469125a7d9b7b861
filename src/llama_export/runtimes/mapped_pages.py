"""Handing a package's weight-file pages back to the kernel once ONNX Runtime has read them.

ONNX Runtime maps a package's external data file into memory and, at session creation, its CPU kernels pack the
weights into buffers of their own. MatMulNBits (int8 activations, x86) copies the scales into its packed buffer
but keeps the mapping of the original scales, so pages it never reads again stay resident: for an 8B INT4
package the session would hold its packed weights plus most of the scales a second time. Asking the kernel to
page the file's mapped pages out (madvise MADV_PAGEOUT) drops clean file pages only; any page ONNX Runtime reads
later comes back from the file, so results are unchanged. Linux only; elsewhere nothing is done."""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from contextlib import contextmanager
from pathlib import Path

MADV_PAGEOUT = 21  # Linux 5.4 and later; older kernels refuse it (EINVAL) and nothing changes
WATCH_SECONDS = 0.02  # between passes, pages read wait resident: the session's peak over its steady size


def _madvise():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.madvise
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    function.restype = ctypes.c_int
    return function


def _file_mappings() -> list[tuple[int, int, int, str]]:
    """(start, end, file offset, path) of each of this process's file mappings."""
    try:
        with open("/proc/self/maps") as maps:
            lines = maps.readlines()
    except OSError:
        return []
    mappings = []
    for line in lines:
        fields = line.split(maxsplit=5)
        path = fields[5].rstrip("\n") if len(fields) == 6 else ""
        if path.startswith(os.sep):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            mappings.append((start, end, int(fields[2], 16), path))
    return mappings


def page_out(folder: str | Path) -> int:
    """Pages out this process's mappings of files inside `folder`; returns how many mappings were advised."""
    madvise = _madvise()
    if madvise is None:
        return 0
    prefix = os.path.realpath(folder) + os.sep
    advised = 0
    files: dict[str, int | None] = {}  # one descriptor a file, however many mappings of it
    try:
        for start, end, offset, path in _file_mappings():
            if path.startswith(prefix):
                if path not in files:
                    files[path] = _open_quietly(path)
                _drain_page_batches(files[path], offset, end - start)
                advised += madvise(start, end - start, MADV_PAGEOUT) == 0
    finally:
        for fd in files.values():
            if fd is not None:
                os.close(fd)
    return advised


def page_out_libraries(folder: str | Path) -> int:
    """Pages out this process's other file mappings, its interpreter's and libraries' code: what runs next comes
    straight back, and the pages of libraries idle while ONNX Runtime loads (PyTorch's, in an export) are handed
    back meanwhile."""
    madvise = _madvise()
    if madvise is None:
        return 0
    prefix = os.path.realpath(folder) + os.sep
    return sum(madvise(start, end - start, MADV_PAGEOUT) == 0
               for start, end, _, path in _file_mappings() if not path.startswith(prefix))


def _open_quietly(path: str) -> int | None:
    try:
        return os.open(path, os.O_RDONLY)
    except OSError:
        return None


def _drain_page_batches(fd: int | None, offset: int, length: int) -> None:
    """Pages just faulted in wait in per-CPU batches before they join the kernel's page lists, and MADV_PAGEOUT
    skips them there: the pages other threads of ONNX Runtime read stay resident. POSIX_FADV_DONTNEED over a
    mapped range cannot drop its mapped pages, and on that failure the kernel drains every CPU's batch."""
    if fd is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def _flush(folder: str | Path) -> None:
    """Writes the folder's files to disk: a page written but not yet on disk, or on its way there, is never paged
    out (a package just exported is all such pages)."""
    for path in Path(folder).rglob("*"):
        try:
            if path.is_file():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError:
            pass


@contextmanager
def paged_out_while_loading(folder: str | Path):
    """Pages out the process's libraries once, and the folder's mapped files every WATCH_SECONDS while the block
    runs (ONNX Runtime creates a session without holding the GIL, so this thread runs beside it) and once at the
    end, so the pages the kernels have finished packing never pile up."""
    _flush(folder)
    page_out_libraries(folder)
    done = threading.Event()

    def watch():
        while not done.wait(WATCH_SECONDS):
            page_out(folder)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()
        page_out(folder)
