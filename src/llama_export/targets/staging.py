"""The output folder's safety: a package is written in a hidden sibling folder and swapped into place only when
complete; one export at a time per output (a lock file beside it); the output re-checked at the swap, so a
folder that appeared meanwhile is never replaced; staging folders of killed exports swept by the next run."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import json
import os
import re
import shutil
from pathlib import Path

from llama_export.targets.base import TargetError

MANIFEST = "manifest.json"
TOOL = "llama-export"
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2  # Linux renameat2 flags


def is_package(path: Path) -> bool:
    try:
        return json.loads((path / MANIFEST).read_text()).get("tool") == TOOL
    except (OSError, ValueError, AttributeError):
        return False


def check_output(output: Path, force: bool) -> None:
    """Refuse, before any work, an output path that exists and is not a package from this tool, or one that
    holds the current folder (it would be swapped away under the shell)."""
    output = output.absolute()
    here = Path.cwd().absolute()
    if output == here or output in here.parents:
        raise TargetError(f"--output {output} is the current folder or one above it; name a new folder for the "
                          "package, e.g. --output ./package")
    try:
        replaceable = output.is_dir() and (is_package(output) or not any(output.iterdir()))
    except OSError as exc:
        raise TargetError(f"cannot read the output folder {output}: {exc.strerror}") from None
    if output.exists() and not force and not replaceable:
        raise TargetError(f"output path exists and is not a llama-export package: {output} (use --force to "
                          "replace it)")


@contextlib.contextmanager
def output_lock(output: Path):
    """Hold `.NAME.lock` beside the output for the whole export; a second export to the same output refuses.
    Holding it, the staging folders that killed exports to this output left are swept."""
    import fcntl

    output = output.absolute()
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        probe = output.parent / f".{output.name}.probe-{os.getpid()}"
        probe.mkdir()
        probe.rmdir()
        fd = os.open(output.parent / f".{output.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise TargetError(f"cannot write the package beside {output}: {exc.strerror} ({output.parent}); choose "
                          "another --output") from None
    lock_path = output.parent / f".{output.name}.lock"
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            raise TargetError(f"another export is writing {output} (pid {holder}); wait for it to finish or "
                              "choose another --output") from None
        if os.fstat(fd).st_nlink == 0:  # unlinked by the holder that just finished
            raise TargetError(f"another export just finished writing {output}; run again")
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            with contextlib.suppress(OSError):
                _sweep_dead_staging(output)
            yield
        finally:
            with contextlib.suppress(OSError):
                lock_path.unlink()
    finally:
        os.close(fd)


def _sweep_dead_staging(output: Path) -> None:
    """This output's staging folders whose export no longer runs. A `-old` folder (the fallback swap, killed
    between its two renames) holds the previous package: it goes back into place if the output is missing."""
    for entry in output.parent.glob(f".{glob.escape(output.name)}.partial-*"):
        match = re.fullmatch(r"\.partial-(\d+)(-old)?", entry.name[len(output.name) + 1:])
        if not match or not entry.is_dir() or entry.is_symlink() or _pid_alive(int(match.group(1))):
            continue
        if match.group(2) and not (output.exists() or output.is_symlink()):
            entry.rename(output)
        else:
            shutil.rmtree(entry, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


@contextlib.contextmanager
def staged_package(output: Path, force: bool):
    """Yields a staging folder; on success it takes `output`'s place in one atomic step, on any failure (or a
    signal) it is deleted. The output is checked again just before the swap."""
    output = output.absolute()
    check_output(output, force)
    staging = output.parent / f".{output.name}.partial-{os.getpid()}"
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    except OSError as exc:
        raise TargetError(f"cannot write the package beside {output}: {exc.strerror}; choose another --output") \
            from None
    try:
        yield staging
        check_output(output, force)
        _swap_into_place(staging, output)
    except OSError as exc:
        if exc.filename is not None and not _under(exc.filename, staging, output):
            raise TargetError(f"{exc.filename}: {exc.strerror}") from None
        free = ""
        with contextlib.suppress(OSError):
            free = f" ({shutil.disk_usage(output.parent).free / 1e9:.1f} GB free there)"
        raise TargetError(f"writing the package at {output} failed: {exc.strerror or exc}{free}; free some space "
                          "or choose another --output") from None
    finally:  # after a swap, staging holds the replaced package (or the link that was the output)
        if staging.is_symlink():
            staging.unlink()
        else:
            shutil.rmtree(staging, ignore_errors=True)


def _under(filename, *folders: Path) -> bool:
    path = Path(os.fsdecode(filename)).absolute()
    return any(path == folder or folder in path.parents for folder in folders)


def _swap_into_place(staging: Path, output: Path) -> None:
    """Exchange staging and output atomically (Linux renameat2), so no moment leaves neither in place; plain
    renames where the kernel or filesystem lacks it."""
    exists = output.exists() or output.is_symlink()
    flags = _RENAME_EXCHANGE if exists else _RENAME_NOREPLACE
    if _renameat2(staging, output, flags):
        return
    if not exists:
        staging.rename(output)
        return
    old = output.parent / f".{output.name}.partial-{os.getpid()}-old"
    output.rename(old)
    try:
        staging.rename(output)
    except BaseException:
        old.rename(output)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()


def _renameat2(source: Path, dest: Path, flags: int) -> bool:
    """True when done; False when the system has no renameat2 (other errors raise, naming the path)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(source), at_fdcwd, os.fsencode(dest), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL):
        return False
    if code == errno.EEXIST:
        raise TargetError(f"{dest} appeared while the package was written; nothing was replaced (run again, with "
                          "--force to replace it)")
    raise TargetError(f"cannot move the package into place at {dest}: {os.strerror(code)}")
