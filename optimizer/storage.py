"""Where a study lives: an embedded Optuna journal under ``studies/<study>/`` by default, or any URL.

Layout of the default study directory ``<root>/<study>/``:
    journal.log     Optuna ``JournalStorage(JournalFileBackend(...))`` (append-only; survives Ctrl-C
                    and crashes: every finished trial is one appended record)
    variants.json   the variants of the study (metadata only), a plain-JSON record for people and
                    tools (workers rebuild the search from the spec kept in the study itself)
    pareto.csv, trials.csv, pareto.png, report.html   reports

``--storage`` takes any Optuna storage URL (``sqlite:///x.db``, ``postgresql+psycopg://...``); the
study directory is still used for variants.json and reports.

Journal storage has no heartbeat, so a killed search leaves its trial RUNNING. :func:`sweep_stale`
fails RUNNING trials whose recorded ``host``/``pid`` user attributes name a dead process on this host.
"""

from __future__ import annotations

import os
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optimizer.errors import BadOptionError, StorageError, storage_os_error
from optimizer.journal import set_aside_partial_record

if TYPE_CHECKING:  # pragma: no cover
    import optuna

DEFAULT_ROOT = Path("studies")
JOURNAL_NAME = "journal.log"
VARIANTS_NAME = "variants.json"
#: Longest study name, in UTF-8 bytes (file systems allow 255 per name; reports add suffixes).
MAX_STUDY_NAME_BYTES = 200


def study_dir(*, study: str, root: Path = DEFAULT_ROOT) -> Path:
    """The directory of ``study`` (not created)."""
    from optimizer.textsafe import safe

    if len(study.encode("utf-8", "surrogatepass")) > MAX_STUDY_NAME_BYTES:
        raise BadOptionError(f"invalid study name {safe(repr(study[:40]))}...: {len(study.encode('utf-8', 'surrogatepass'))} "
                             f"bytes in UTF-8, at most {MAX_STUDY_NAME_BYTES} (it names a folder)")
    if (not study or "/" in study or "\\" in study or study in (".", "..")
            or any(ord(ch) < 32 or 0x7F <= ord(ch) <= 0x9F for ch in study)):
        raise BadOptionError(f"invalid study name {safe(repr(study))}: it names a folder, so it cannot be empty, '.' or "
                             "'..', or hold '/', '\\' or control characters")
    return root / study


@dataclass(frozen=True)
class Heartbeat:
    """Heartbeat of RUNNING trials in a database storage (seconds); see :mod:`optimizer.study.liveness`."""

    interval: int
    grace: int
    max_retry: int


def is_rdb(url: str | None) -> bool:
    """Whether ``url`` names an SQLAlchemy database (SQLite, PostgreSQL, MySQL)."""
    return bool(url) and str(url).startswith(("sqlite:", "postgresql", "mysql"))


def safe_url(url: str) -> str:
    """``url`` with any password (user info or ``?password=``-like query value) replaced by ``***``
    and control characters escaped (for messages; never log a raw URL)."""
    from optimizer.textsafe import safe

    try:
        from sqlalchemy.engine import make_url

        return safe(make_url(url).render_as_string(hide_password=True))
    except Exception:  # not an SQLAlchemy URL: keep scheme and host only
        scheme, _, rest = url.partition("://")
        host = rest.rpartition("@")[2].split("/")[0].split("?")[0]
        return safe(f"{scheme}://{host}/...") if rest else "<storage>"


def engine_kwargs(url: str) -> dict[str, Any]:
    """SQLAlchemy engine options for ``url``: bounded waits (SQLite lock 20 s, PostgreSQL connect 10 s)."""
    if url.startswith("sqlite:"):
        return {"connect_args": {"timeout": 20}}
    if url.startswith("postgresql"):
        return {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
    return {"pool_pre_ping": True}


def first_line(e: BaseException) -> str:
    """The first non-blank line of ``e`` (at most 200 characters, without SQLAlchemy's background link)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    if "(Background on this error" in text:
        text = text.split("(Background on this error")[0].strip()
    return text[:200]


def open_storage(*, study: str, url: str | None, root: Path = DEFAULT_ROOT, heartbeat: Heartbeat | None = None,
                 connect_attempts: int = 1, sleep: Callable[[float], None] = time.sleep) -> Any:
    """An Optuna storage: the journal file of ``study`` when ``url`` is None, else ``url``.

    A database URL (:func:`is_rdb`) becomes an ``RDBStorage`` (with ``heartbeat`` when given: heartbeat
    interval, grace period and ``RetryHeartbeatStaleTrialCallback``); a database that cannot be
    reached is tried ``connect_attempts`` times with a doubling back-off (1 s, 2 s, ...). Every
    failure is one line with the password hidden.

    Raises:
        BadOptionError: ``url`` is not a valid storage URL.
        StorageError: the storage cannot be opened or reached.
    """
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if is_rdb(url):
        assert url is not None
        return _open_rdb(url, heartbeat=heartbeat, connect_attempts=connect_attempts, sleep=sleep)
    try:
        if url is None:
            d = study_dir(study=study, root=root)
            d.mkdir(parents=True, exist_ok=True)
            set_aside_partial_record(d / JOURNAL_NAME)  # a crash or full disk left half a record
            return JournalStorage(JournalFileBackend(str(d / JOURNAL_NAME)))
        return optuna.storages.get_storage(url)
    except (StorageError, BadOptionError):
        raise
    except OSError as e:  # read-only, full, permission: one line naming the file
        raise storage_os_error(e, doing="open the study storage") from None
    except Exception as e:  # unknown schemes, damaged records: one line, no URL (it may hold a password)
        raise StorageError(f"cannot open the study storage ({type(e).__name__}: {first_line(e)})") from None


def _open_rdb(url: str, *, heartbeat: Heartbeat | None, connect_attempts: int,
              sleep: Callable[[float], None]) -> Any:
    from optuna.exceptions import ExperimentalWarning
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    attempts = max(connect_attempts, 1)
    last: BaseException | None = None
    delay = 1.0
    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():  # heartbeat and its retry callback are "experimental" in Optuna
                warnings.simplefilter("ignore", ExperimentalWarning)
                if heartbeat is None:
                    return RDBStorage(url, engine_kwargs=engine_kwargs(url))
                return RDBStorage(
                    url, engine_kwargs=engine_kwargs(url), heartbeat_interval=heartbeat.interval,
                    grace_period=heartbeat.grace,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=heartbeat.max_retry),
                )
        except ImportError as e:
            raise StorageError(f"cannot open {safe_url(url)}: missing database driver ({e.name}); "
                               "pip install 'exl2opt[postgres]'") from None
        except Exception as e:  # sqlalchemy OperationalError / ArgumentError ...
            if type(e).__name__ in ("ArgumentError", "NoSuchModuleError") or isinstance(e, ValueError):
                raise BadOptionError(f"invalid --storage URL {safe_url(url)} ({type(e).__name__}: "
                                     f"{first_line(e)}); expected e.g. postgresql+psycopg://user:password@host:5432/db"
                                     ) from None
            last = e
            if attempt + 1 < attempts:
                sleep(delay)
                delay *= 2
    assert last is not None
    raise StorageError(
        f"cannot reach the study storage {safe_url(url)} after {attempts} attempt(s) "
        f"({type(last).__name__}: {first_line(last)}); is the server running and reachable from this machine?"
    ) from None


def this_host() -> str:
    return socket.gethostname()


def pid_alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(study: optuna.Study) -> list[int]:
    """Fail RUNNING trials started by a dead process on this host; returns their numbers.

    Such a trial gets user attribute ``reason = "stale"`` and is retried by the next search.
    """
    from optuna.trial import TrialState

    host = this_host()
    swept = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get("host") != host:
            continue
        pid = int(t.user_attrs.get("pid", -1))
        if pid == os.getpid() or pid_alive(pid):
            continue
        study._storage.set_trial_user_attr(t._trial_id, "reason", "stale")
        study._storage.set_trial_user_attr(t._trial_id, "status", "failed")
        study.tell(t.number, state=TrialState.FAIL)
        swept.append(t.number)
    return swept
