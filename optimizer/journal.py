"""A study journal that survives crashes: a partial last record is set aside before resuming.

Optuna's ``JournalFileBackend`` appends one JSON line per record (under its symlink lock, then
``fsync``). A process killed mid-write, or a disk that fills mid-write, leaves a last line without
its newline. Optuna skips that line when reading, but the next append is written onto it, and from
then on the joined line is invalid JSON in the middle of the file: the study can no longer be read.

:func:`set_aside_partial_record` runs before the journal is opened: under the same lock Optuna's
writers take (so a record being written right now is never mistaken for a remnant), it copies the
bytes after the last newline to ``journal.log.partial-<unix time>`` next to the journal and
truncates the journal to its last complete record. Finished trials are complete records, so none
is lost; the trial whose record was cut is failed as stale and retried by the resumed run.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import BinaryIO

from optimizer.textsafe import safe

#: Bytes read per step while looking backwards for the last newline.
_STEP = 64 * 2**10
_log = logging.getLogger("exl2opt")


def _last_newline_end(f: BinaryIO, size: int) -> int:
    """Offset just after the last ``\\n`` of the open binary file ``f`` (0 when there is none)."""
    pos = size
    while pos > 0:
        start = max(0, pos - _STEP)
        f.seek(start)
        block = f.read(pos - start)
        i = block.rfind(b"\n")
        if i >= 0:
            return start + i + 1
        pos = start
    return 0


def set_aside_partial_record(path: Path) -> Path | None:
    """Move a partial last record of the journal at ``path`` aside; return where it went (None: intact).

    Raises:
        OSError: the journal or its folder cannot be written (read-only, disk full); the caller
            maps it to one line (``optimizer.errors.storage_os_error``).
    """
    if not path.is_file() or path.stat().st_size == 0:
        return None
    from optuna.storages.journal import JournalFileSymlinkLock

    lock = JournalFileSymlinkLock(str(path))
    with open(path, "rb") as f:  # cheap check without the lock: the common case is intact
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return None
    lock.acquire()
    try:
        with open(path, "r+b") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return None  # a writer finished its record while we waited for the lock
            keep = _last_newline_end(f, size)
            f.seek(keep)
            aside = path.with_name(f"{path.name}.partial-{int(time.time())}")
            with open(aside, "wb") as out:  # copied in bounded pieces, whatever its length
                shutil.copyfileobj(f, out, _STEP)
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
    finally:
        lock.release()
    _log.warning("exl2opt: warning: %s ended with a partial record (%d bytes, from a crash or a full disk); "
                 "set aside as %s, resuming from the last complete record", safe(path), size - keep, safe(aside.name))
    return aside
