"""Keep a run folder safe: one run at a time, no silent overwrite, checkpoints that survive a crash.

None of this is the lesson (the lesson is what goes *into* a checkpoint, in each train.py); it is the
plumbing that keeps a learner's finished 10-minute run from being lost to a typo, a second terminal,
a full disk or a kill at the wrong moment.

    lock = lock_run_dir(out_dir)                     # a second run in the same folder fails at once
    check_fresh_run_dir(out_dir, overwrite=False)    # refuse to replace a finished run by accident
    atomic_save(checkpoint, out_dir / "ckpt.pt")     # the old file survives until the new one is whole
"""
from __future__ import annotations

import errno
import io
import os
import tempfile
from pathlib import Path

import torch

try:  # POSIX (Linux, macOS); on Windows the lock is skipped
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

RUN_FILES = ("ckpt.pt", "metrics.jsonl")  # what a finished (or running) run leaves in its folder


def lock_run_dir(out_dir: str | os.PathLike):
    """Take an exclusive lock on out_dir (created if needed) for as long as this process lives.

    Returns the open lock file: keep a reference to it. The operating system drops the lock when the
    process ends, however it ends (kill -9 included), so a crashed run never leaves a stale lock.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lock_file = open(out_dir / ".lock", "a+")
    if fcntl is not None:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.seek(0)
            owner = lock_file.read().strip() or "?"
            lock_file.close()
            raise FileExistsError(f"another run (pid {owner}) is using {out_dir}: wait for it to finish, "
                                  "or give this one its own --out_dir") from None
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.write(str(os.getpid()))
        lock_file.flush()
    return lock_file


def check_fresh_run_dir(out_dir: str | os.PathLike, overwrite: bool, resumable: bool = True) -> None:
    """A fresh run must not replace a run already in out_dir, unless asked to (--overwrite)."""
    out_dir = Path(out_dir)
    found = [name for name in RUN_FILES if (out_dir / name).is_file()]
    if found and not overwrite:
        resume = "continue it with --init_from resume, " if resumable else ""
        raise FileExistsError(f"{out_dir} already holds a run ({', '.join(found)}): {resume}pick another "
                              "--out_dir, or replace it with --overwrite")


def atomic_save(obj, path: str | os.PathLike) -> None:
    """torch.save(obj, path) so that path always holds either the old file or the whole new one.

    The bytes go to a unique temporary file in the same folder (same file system, so the rename is
    atomic), are flushed and fsync'ed to the disk, and only then renamed over path. A crash or kill at
    any moment leaves the previous checkpoint intact; a failure removes the temporary file. A full disk
    is reported as such (torch.save's own message for it is an obscure 'unexpected pos').
    """
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(obj, buffer)  # serialise in memory first, so a write error is a plain OSError
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private (0600); give it a normal file's mode
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())  # on the disk, not only in the OS's cache, before the rename
        os.replace(tmp, path)  # atomic on POSIX and Windows
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(f"disk full while saving {path} ({buffer.tell() / 2**20:.1f} MiB); free some space "
                          f"and resume: the previous {path.name} is untouched") from err
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        dir_fd = os.open(path.parent, os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
