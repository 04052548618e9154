"""Where a study lives: an embedded Optuna journal under ``studies/<study>/`` by default, or any URL.

Layout of the default study directory ``<root>/<study>/``:
    journal.log     Optuna ``JournalStorage(JournalFileBackend(...))`` (append-only; survives Ctrl-C
                    and crashes: every finished trial is one appended record)
    variants.json   the variants of the study (metadata only) so ``exl2opt report`` and workers can
                    rebuild them without the original ``--model`` sources
    pareto.csv, trials.csv, pareto.png, pareto.html   reports

``--storage`` takes any Optuna storage URL (``sqlite:///x.db``, ``postgresql+psycopg://...``); the
study directory is still used for variants.json and reports.

Journal storage has no heartbeat, so a killed search leaves its trial RUNNING. :func:`sweep_stale`
fails RUNNING trials whose recorded ``host``/``pid`` user attributes name a dead process on this host.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optimizer.errors import StorageError

if TYPE_CHECKING:  # pragma: no cover
    import optuna

DEFAULT_ROOT = Path("studies")
JOURNAL_NAME = "journal.log"
VARIANTS_NAME = "variants.json"


def study_dir(*, study: str, root: Path = DEFAULT_ROOT) -> Path:
    """The directory of ``study`` (not created)."""
    if not study or "/" in study or "\\" in study or study in (".", ".."):
        raise StorageError(f"invalid study name {study!r}: use letters, digits, '-', '_' and '.'")
    return root / study


def open_storage(*, study: str, url: str | None, root: Path = DEFAULT_ROOT) -> Any:
    """An Optuna storage: the journal file of ``study`` when ``url`` is None, else ``url``."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    try:
        if url is None:
            d = study_dir(study=study, root=root)
            d.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(d / JOURNAL_NAME)))
        if url.startswith(("sqlite:", "postgresql", "mysql")):
            return optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(url))
        return optuna.storages.get_storage(url)
    except StorageError:
        raise
    except Exception as e:  # sqlalchemy / psycopg / OS errors: one line, no URL (it may hold a password)
        raise StorageError(f"cannot open the study storage ({type(e).__name__}: {_first_line(e)})") from None


def _engine_kwargs(url: str) -> dict[str, Any]:
    if url.startswith("sqlite:"):
        return {"connect_args": {"timeout": 20}}
    return {"pool_pre_ping": True}


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else ""


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
