"""The output folder's safety: a package is written in a hidden sibling folder and swapped into place only when
complete; one export at a time per output (a lock file beside it); the output re-checked at the swap, so a
folder that appeared meanwhile is never replaced; staging folders of killed exports swept by the next run."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
from pathlib import Path

from targets.base import TargetError

MANIFEST = "manifest.json"
TOOL = "llama-export"
_STAGING_RE = re.compile(r"\..+\.partial-(\d+)(-old)?")
_LOCK_RE = re.compile(r"\..+\.lock")
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
    if output.exists() and not force and not (output.is_dir() and (is_package(output) or not any(output.iterdir()))):
        raise TargetError(f"output path exists and is not a llama-export package: {output} (use --force to "
                          "replace it)")


@contextlib.contextmanager
def output_lock(output: Path):
    """Hold `.NAME.lock` beside the output for the whole export; a second export to the same output refuses."""
    import fcntl

    output = output.absolute()
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        probe = output.parent / f".{output.name}.probe-{os.getpid()}"
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        raise TargetError(f"cannot write the package beside {output}: {exc.strerror} ({output.parent}); choose "
                          "another --output") from None
    lock_path = output.parent / f".{output.name}.lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            raise TargetError(f"another export is writing {output} (pid {holder}); wait for it to finish or "
                              "choose another --output") from None
        if os.fstat(fd).st_ino != _inode(lock_path):  # unlinked by the holder that just finished: start over
            raise TargetError(f"another export just finished writing {output}; run again")
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        _sweep_dead_staging(output.parent)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                lock_path.unlink()
    finally:
        os.close(fd)


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except OSError:
        return None


def _sweep_dead_staging(folder: Path) -> None:
    """Staging folders and lock files left by exports that were killed (their PID no longer runs)."""
    for entry in folder.iterdir():
        match = _STAGING_RE.fullmatch(entry.name)
        if match and entry.is_dir() and not entry.is_symlink() and not _pid_alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
        elif _LOCK_RE.fullmatch(entry.name) and entry.is_file() and not entry.is_symlink():
            _remove_dead_lock(entry)


def _remove_dead_lock(path: Path) -> None:
    """A lock file holding a PID that no process locks any more (one holding other text is not ours)."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return
    try:
        if not os.pread(fd, 32, 0).decode(errors="replace").strip().isdigit():
            return
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_ino == _inode(path):
            path.unlink()
    except OSError:  # held by a running export, or gone meanwhile
        pass
    finally:
        os.close(fd)


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
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        check_output(output, force)
        _swap_into_place(staging, output)
    except OSError as exc:  # a full disk, a quota, a file size limit: named with the space left
        free = shutil.disk_usage(output.parent).free / 1e9
        raise TargetError(f"writing the package at {output} failed: {exc.strerror or exc} ({free:.1f} GB free "
                          "there); free some space or choose another --output") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # after a swap it holds the replaced package


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
    staging.rename(output)
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
