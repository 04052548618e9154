"""Locks that keep processes of one study from measuring a configuration twice.

* :class:`ClaimLock` is held (for milliseconds, never during a measurement) while a worker reads
  every trial and turns its pick into a RUNNING trial: PostgreSQL ``pg_advisory_lock`` on a key
  derived from the study name, MySQL ``GET_LOCK``, journal / SQLite on one machine ``flock`` on
  ``<study dir>/claims.lock``. A worker killed while holding it releases it (the server drops a dead
  session's advisory locks; the kernel drops a dead process's ``flock``).
* :class:`RunLock` decides who may run an embedded (journal or SQLite) study on this machine: one
  ``exl2opt search``, or any number of cooperating ``exl2opt worker`` processes;
  :class:`ServerRunLock` does the same for a PostgreSQL study from any machine.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from optimizer.errors import StorageError, StudyBusyError
from optimizer.storage import DEFAULT_ROOT, engine_kwargs, first_line, study_dir

# ----- claim lock --------------------------------------------------------------------------------


class _Session:
    """One database connection of its own (no pool) for advisory locks; closing it frees them on the server."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._engine: Any = None
        self.conn: Any = None

    def connect(self) -> Any:
        """The open connection (opened on first use)."""
        if self.conn is None:
            import sqlalchemy
            from sqlalchemy.pool import NullPool

            self._engine = sqlalchemy.create_engine(self._url, poolclass=NullPool,
                                                    **{k: v for k, v in engine_kwargs(self._url).items()
                                                       if k == "connect_args"})
            self.conn = self._engine.connect()
        return self.conn

    def close(self) -> None:
        """Close the connection and its engine; errors are ignored (a lost connection is closed already)."""
        with contextlib.suppress(Exception):
            if self.conn is not None:
                self.conn.close()
        with contextlib.suppress(Exception):
            if self._engine is not None:
                self._engine.dispose()
        self.conn = self._engine = None


class ClaimLock:
    """A lock shared by every worker of one study (see module docstring). Re-entrant per process."""

    def __init__(self, *, study_name: str, url: str | None, lock_dir: Path) -> None:
        self._study_name = study_name
        self._url = url
        self._lock_dir = lock_dir
        self._db = _Session(url) if url else None
        self._fd: int | None = None
        self._depth = 0
        digest = hashlib.sha256(f"exl2opt:{study_name}".encode()).digest()
        self._key = int.from_bytes(digest[:8], "big", signed=True)

    @property
    def kind(self) -> str:
        if self._url and self._url.startswith("postgresql"):
            return "postgresql"
        if self._url and self._url.startswith("mysql"):
            return "mysql"
        return "file"

    def _connect(self) -> Any:
        assert self._db is not None
        return self._db.connect()

    def acquire(self) -> None:
        if self._depth:
            self._depth += 1
            return
        import sqlalchemy

        try:
            if self.kind == "postgresql":
                conn = self._connect()
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": self._key})
                conn.commit()
            elif self.kind == "mysql":
                conn = self._connect()
                conn.execute(sqlalchemy.text("SELECT GET_LOCK(:k, -1)"), {"k": f"exl2opt:{self._study_name}"[:64]})
                conn.commit()
            else:
                self._lock_dir.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self._lock_dir / "claims.lock", os.O_RDWR | os.O_CREAT, 0o644)
                fcntl.flock(self._fd, fcntl.LOCK_EX)
        except StorageError:
            raise
        except Exception as e:
            self._drop()
            raise StorageError(f"cannot take the study's claim lock ({type(e).__name__}: {first_line(e)})") from None
        self._depth = 1

    def release(self) -> None:
        if self._depth > 1:
            self._depth -= 1
            return
        self._depth = 0
        import sqlalchemy

        try:
            conn = self._db.conn if self._db is not None else None
            if self.kind == "postgresql" and conn is not None:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": self._key})
                conn.commit()
            elif self.kind == "mysql" and conn is not None:
                conn.execute(sqlalchemy.text("SELECT RELEASE_LOCK(:k)"), {"k": f"exl2opt:{self._study_name}"[:64]})
                conn.commit()
            elif self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
                self._fd = None
        except Exception:  # a lost connection releases the server-side lock by itself
            self._drop()

    def _drop(self) -> None:
        if self._db is not None:
            self._db.close()
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        self._depth = 0
        self._drop()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self.acquire()
        try:
            yield
        finally:
            self.release()


#: Run locks held by this process: path -> [fd, holders]. Re-entrant per process on purpose: a lock
#: left behind by a failed run (its frame kept alive by a traceback) must not block the next run of
#: the same process; the lock only has to keep *other* processes out.
_HELD_RUN_LOCKS: dict[str, list[int]] = {}


class RunLock:
    """Who may run an *embedded* study (journal or SQLite file) on this machine.

    ``exl2opt search`` (single-process loop) takes it exclusively, every ``exl2opt worker`` shared:
    workers cooperate with each other, but a second ``search`` (or a worker next to a search, or a
    search next to workers) is refused with one clear line instead of measuring the same
    configurations twice. The kernel drops the lock when its process dies. PostgreSQL studies use
    :class:`ServerRunLock`; their workers also claim through :class:`ClaimLock`.
    """

    def __init__(self, *, lock_dir: Path, study_name: str) -> None:
        self._path = lock_dir / "run.lock"
        self._study = study_name
        self._held = False

    def acquire(self, *, exclusive: bool) -> RunLock:
        key = str(self._path.resolve())
        if key in _HELD_RUN_LOCKS:
            _HELD_RUN_LOCKS[key][1] += 1
            self._held = True
            return self
        self._path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise busy_error(study_name=self._study, exclusive=exclusive, where="on this machine") from None
        _HELD_RUN_LOCKS[key] = [fd, 1]
        self._held = True
        return self

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        key = str(self._path.resolve())
        entry = _HELD_RUN_LOCKS.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del _HELD_RUN_LOCKS[key]
            with contextlib.suppress(OSError):
                fcntl.flock(entry[0], fcntl.LOCK_UN)
                os.close(entry[0])

    def __del__(self) -> None:  # safety net when a run ends by an exception before its finally
        if not self._held:
            return
        try:
            self.release()
        except Exception:  # noqa: SIM105  (interpreter shutdown: contextlib may be gone; the kernel drops the lock)
            return


def busy_error(*, study_name: str, exclusive: bool, where: str) -> StudyBusyError:
    """The one line for a run lock held by another process."""
    if exclusive:
        return StudyBusyError(f"study {study_name!r} is already being run by another exl2opt process {where}; wait "
                              "for it to finish")
    return StudyBusyError(f"study {study_name!r} is being run by exl2opt search {where}; wait for it to finish "
                          "(workers can join a study only when no single-process search is running it)")


class ServerRunLock:
    """:class:`RunLock` for a PostgreSQL study: a session advisory lock on the database server
    (exclusive for a single-process ``search`` with a sampler, shared for workers), so no two runs
    that do not cooperate measure the same study from any machine. The server drops it when the
    process or its connection dies."""

    def __init__(self, *, study_name: str, url: str) -> None:
        self._study = study_name
        self._db = _Session(url)
        digest = hashlib.sha256(f"exl2opt-run:{study_name}".encode()).digest()
        self._key = int.from_bytes(digest[:8], "big", signed=True)

    def acquire(self, *, exclusive: bool) -> ServerRunLock:
        import sqlalchemy

        fn = "pg_try_advisory_lock" if exclusive else "pg_try_advisory_lock_shared"
        try:
            self._db.close()  # a fresh session for every acquire
            conn = self._db.connect()
            got = bool(conn.execute(sqlalchemy.text(f"SELECT {fn}(:k)"), {"k": self._key}).scalar())
            conn.commit()
        except Exception as e:
            self.release()
            raise StorageError(f"cannot take the study's run lock ({type(e).__name__}: {first_line(e)})") from None
        if not got:
            self.release()
            raise busy_error(study_name=self._study, exclusive=exclusive, where="on this database")
        return self

    def release(self) -> None:
        """Close the session (the server releases its advisory locks with it)."""
        self._db.close()


def lock_dir_for(*, study_name: str, storage_url: str | None, root: Path = DEFAULT_ROOT) -> Path:
    """Where the file locks of an embedded study live: its study directory for the journal; for
    SQLite, next to the database file (``.<db name>.exl2opt/<study hash>/``), so every process that
    opens the same database takes the same locks, whatever its current or studies directory."""
    if storage_url is None or not storage_url.startswith("sqlite:"):
        return study_dir(study=study_name, root=root)
    db = _sqlite_file(storage_url)
    if db is None:  # an in-memory database lives in one process only
        return study_dir(study=study_name, root=root)
    digest = hashlib.sha256(study_name.encode()).hexdigest()[:16]
    return db.parent / f".{db.name}.exl2opt" / digest


def _sqlite_file(url: str) -> Path | None:
    """The database file of a ``sqlite:///path`` URL (absolute, symlinks resolved), None for memory."""
    rest = url.split(":", 1)[1]
    path = rest[3:] if rest.startswith("///") else ""
    path = path.split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return Path(path).expanduser().resolve()


def run_lock_for(*, study_name: str, storage_url: str | None,
                 root: Path = DEFAULT_ROOT) -> RunLock | ServerRunLock | None:
    """The run lock of a study: a file lock for embedded storages, an advisory lock on PostgreSQL,
    None for other database servers (their workers are coordinated by :class:`ClaimLock` alone)."""
    if storage_url is not None and storage_url.startswith("postgresql"):
        return ServerRunLock(study_name=study_name, url=storage_url)
    if storage_url is not None and not storage_url.startswith("sqlite:"):
        return None
    return RunLock(lock_dir=lock_dir_for(study_name=study_name, storage_url=storage_url, root=root),
                   study_name=study_name)
