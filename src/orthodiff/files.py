"""Crash-safe file writes: one place for the temp-file-then-rename pattern."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path, shared: bool = False):
    """Yield a temporary path beside `path`; on success fsync it and rename it onto `path`.

    The rename is atomic on one filesystem, so a process killed mid-write leaves the
    previous file intact (at worst a stray `.<name>.tmp` that the next write replaces).
    The temporary file sits beside the target on purpose: staging in TMPDIR, as
    Lightning's writer does, turns the rename into a copy when TMPDIR is another disk.
    `shared`: other processes may write the same file at once (a cache that data-loader
    workers or parallel runs fill), so each stages in its own `.<name>.<pid>.tmp`.
    A write that fails (a full disk) removes the temporary file and raises an OSError
    naming `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp" if shared else f".{path.name}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as file:
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if not isinstance(error, OSError):
            raise
        message = f"writing {path} failed ({error.strerror or error}); the previous {path.name}, if any, is unchanged"
        raise (OSError(error.errno, message) if error.errno else OSError(message)) from error
