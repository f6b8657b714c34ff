"""Checkpoint files written so that a storage fault is reported, not turned into a hang or a riddle.

Three problems with writing through ``torch.save(obj, path)`` on a cluster:

* The error loses its cause. torch's zip writer turns a failed write into
  ``RuntimeError: [enforce fail at inline_container.cc:...] . unexpected pos ...``; the
  ``No space left on device`` (or ``Input/output error``, ``File too large``) behind it is
  gone. `write_file` writes through a Python file object that keeps the first ``OSError``
  and raises that instead.
* One rank failing alone hangs the others. DeepSpeed's ``save_checkpoint`` has barriers
  inside; a rank that raises between them leaves the others waiting until the process-group
  timeout. `guarded_writes` stands in for each engine's ``checkpoint_engine`` during a save:
  a failed file is recorded (`WriteLog`) and the rank skips its remaining files but keeps
  taking every collective, so all ranks reach the point where they agree on the outcome
  (`CheckpointManager.save`).
* Nothing records what was written. Every file that goes through `write_file` has its size
  and CRC-32 computed from the bytes as they are written (no second read) for the
  checkpoint's manifest (`integrity`); the file is fsync'ed before it counts as written.
"""

from __future__ import annotations

import errno
import os
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path

import torch


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the message is the one line for the user."""


class CheckpointReadError(RuntimeError):
    """A checkpoint file could not be read (truncated, damaged, unreadable); names the file."""


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def free_space(path: str | Path) -> str:
    """'X free of Y' on the filesystem holding `path` (its nearest existing parent)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        usage = shutil.disk_usage(p)
    except OSError as e:
        return f"free space unknown ({e.strerror or e})"
    return f"{human_bytes(usage.free)} free of {human_bytes(usage.total)}"


def describe_oserror(e: OSError) -> str:
    """'No space left on device (ENOSPC)': the system's words and the errno's name."""
    name = errno.errorcode.get(e.errno or 0)
    text = e.strerror or str(e)
    return f"{text} ({name})" if name else text


class _TrackedFile:
    """A binary file whose writes are counted, CRC'ed and whose first OSError is kept."""

    def __init__(self, f):
        self._f = f
        self.size, self.crc = 0, 0
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            n = self._f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise
        view = memoryview(data).cast("B")
        self.crc = zlib.crc32(view, self.crc)
        self.size += view.nbytes
        return n

    def flush(self) -> None:
        self._f.flush()


def write_file(path: str | Path, write: Callable[[_TrackedFile], None]) -> tuple[int, str]:
    """Write `path` through `write(f)`, fsync it; returns (size, CRC-32 as 8 hex digits).

    A failed write raises the ``OSError`` the system reported (not a serializer's message).
    """
    tracked = None
    try:
        with open(path, "wb") as f:
            tracked = _TrackedFile(f)
            write(tracked)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        raise
    except Exception as e:
        if tracked is not None and tracked.error is not None:
            raise tracked.error from e
        raise
    return tracked.size, f"{tracked.crc:08x}"


def torch_save(obj, path: str | Path, zipfile: bool = True) -> tuple[int, str]:
    return write_file(path, lambda f: torch.save(obj, f, _use_new_zipfile_serialization=zipfile))


class WriteLog:
    """One rank's writes during one save: what was written, and the first failure.

    A file that failed half-way is removed if it lies under `inside` (the save's own folder),
    never anywhere else: an error's path can name a source (``shutil.copyfile``'s does).
    """

    def __init__(self, inside: str | Path | None = None):
        self.files: dict[str, tuple[int, str]] = {}  # absolute path -> (size, crc32)
        self.error: str | None = None
        self.inside = Path(os.path.abspath(inside)) if inside is not None else None

    def attempt(self, path: str | Path, write: Callable[[], tuple[int, str]]) -> None:
        """Run one file's `write` unless this rank already failed; record the outcome."""
        if self.error is not None:
            return  # the save is lost anyway: keep the remaining collectives quick
        try:
            self.files[str(path)] = write()
        except Exception as e:  # the outcome is agreed on by all ranks, then raised
            self.fail(path, e)

    def fail(self, path: str | Path, e: BaseException) -> None:
        if self.error is not None:
            return
        cause = describe_oserror(e) if isinstance(e, OSError) else f"{type(e).__name__}: {' '.join(str(e).split())}"
        self.error = f"{path}: {cause}; {free_space(path)} on that filesystem"
        target = Path(os.path.abspath(path))
        if self.inside is not None and target != self.inside and self.inside in target.parents:
            try:  # a half-written file only takes space
                os.remove(target)
            except OSError:
                pass


def failed_path(e: OSError, default: str | Path) -> str | Path:
    """The path an OSError is about: the destination of a copy (``filename2``), else ``filename``."""
    return getattr(e, "filename2", None) or e.filename or default


class _GuardedCheckpointEngine:
    """An engine's checkpoint engine whose ``save`` goes through `write_file` into a `WriteLog`
    and whose ``load`` names the file it failed on. Everything else is the wrapped engine's."""

    def __init__(self, inner, log: WriteLog | None):
        self._inner, self._log = inner, log

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def save(self, state_dict, path: str) -> None:
        zipfile = getattr(self._inner, "zipfile_serialization", True)
        self._log.attempt(path, lambda: torch_save(state_dict, path, zipfile))

    def load(self, path: str, map_location=None):
        try:
            return self._inner.load(path, map_location=map_location)
        except Exception as e:
            raise CheckpointReadError(read_error_text(path, e)) from e


def read_error_text(path: str | Path, e: BaseException) -> str:
    cause = describe_oserror(e) if isinstance(e, OSError) else f"{type(e).__name__}: {' '.join(str(e).split())}"
    return f"{path}: {cause[:300]}"


class guarded_engines:  # noqa: N801 - a context manager
    """While active, each engine's ``checkpoint_engine`` is wrapped (`_GuardedCheckpointEngine`).

    Engines without one (test doubles) are left alone. `log` None: reads only.
    """

    def __init__(self, engines, log: WriteLog | None = None):
        self.engines = [e for _, e in engines.items() if getattr(e, "checkpoint_engine", None) is not None]
        self.log = log

    def __enter__(self):
        for e in self.engines:
            e.checkpoint_engine = _GuardedCheckpointEngine(e.checkpoint_engine, self.log)
        return self

    def __exit__(self, *exc) -> bool:
        for e in self.engines:
            e.checkpoint_engine = e.checkpoint_engine._inner
        return False
