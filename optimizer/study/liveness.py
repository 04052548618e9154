"""Telling live trials from dead ones: heartbeats, the stale sweep, storage outages.

* Heartbeats (RDB storages only; Optuna's ``RDBStorage(heartbeat_interval, grace_period)``): a
  thread records the trial's heartbeat every ``heartbeat_interval`` s while it is measured.
  Optuna's own heartbeat runs only inside ``study.optimize``; the study here uses ask/tell, so
  this module runs the equivalent thread itself, and :func:`fail_stale` sweeps stale trials before
  every claim. A trial silent for more than ``grace_period`` s (its worker was SIGKILLed, lost power
  or network) is failed with ``reason = "stale"`` and re-enqueued once by
  ``RetryHeartbeatStaleTrialCallback(max_retry=1)``.
* Journal storage has no heartbeat: RUNNING trials of dead processes *on this host* are failed
  by :func:`optimizer.storage.sweep_stale` (by pid), then retried the same way.
"""

from __future__ import annotations

import contextlib
import copy
import os
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from optimizer.errors import StorageError
from optimizer.storage import sweep_stale, this_host
from optimizer.study.trials import STALE

if TYPE_CHECKING:  # pragma: no cover
    import optuna


def worker_id() -> str:
    """``host:pid[:gpu]`` of this process (``gpu`` = CUDA_VISIBLE_DEVICES when set)."""
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"{this_host()}:{os.getpid()}" + (f":gpu{gpu}" if gpu else "")


def is_storage_error(e: BaseException) -> bool:
    """Whether ``e`` says the storage could not be reached or written (worth a bounded retry)."""
    from optuna.exceptions import StorageInternalError

    if isinstance(e, (StorageInternalError, StorageError)):
        return True
    try:
        import sqlalchemy.exc
    except ImportError:  # pragma: no cover
        return False
    return isinstance(e, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError,
                          sqlalchemy.exc.DisconnectionError))


def is_taken_over(e: BaseException) -> bool:
    """Whether ``e`` says our trial was already finished by someone else (failed as stale while this
    process was stopped or cut off, then retried elsewhere)."""
    from optuna.exceptions import UpdateFinishedTrialError

    return isinstance(e, UpdateFinishedTrialError)


def heartbeat_enabled(storage: Any) -> bool:
    from optuna.storages._heartbeat import is_heartbeat_enabled

    return bool(is_heartbeat_enabled(storage))


@contextlib.contextmanager
def heartbeat(storage: Any, trial_id: int) -> Iterator[None]:
    """Record the trial's heartbeat every interval while the block runs (no-op without heartbeat).

    A failed write (database briefly unreachable) is retried at the next beat; if the outage
    outlasts the grace period the trial goes stale and is retried elsewhere.
    """
    if not heartbeat_enabled(storage):
        yield
        return
    interval = float(storage.get_heartbeat_interval())
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            with contextlib.suppress(Exception):
                storage.record_heartbeat(trial_id)

    with contextlib.suppress(Exception):
        storage.record_heartbeat(trial_id)
    th = threading.Thread(target=beat, name=f"exl2opt-heartbeat-{trial_id}", daemon=True)
    th.start()
    try:
        yield
    finally:
        stop.set()
        th.join(timeout=interval + 5)


def fail_stale(study: optuna.Study, storage: Any) -> list[int]:
    """Fail RUNNING trials whose worker is gone; returns their numbers.

    Database storages: trials without a heartbeat for more than the grace period (any host), then
    the storage's stale-trial callback (re-enqueue once). Journal storage: trials of dead
    processes on this host (:func:`optimizer.storage.sweep_stale`).
    """
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    if not heartbeat_enabled(storage):
        return list(sweep_stale(study))
    failed: list[int] = []
    numbers: list[int] = []
    for tid in storage._get_stale_trial_ids(study._study_id):
        try:
            storage.set_trial_user_attr(tid, "status", "failed")
            storage.set_trial_user_attr(tid, "reason", STALE)
            storage.set_trial_user_attr(tid, "stale_detail", f"no heartbeat for more than {storage.grace_period} s "
                                        "(worker killed, crashed or cut off); retried by another worker")
            if storage.set_trial_state_values(tid, state=TrialState.FAIL):
                failed.append(tid)
        except UpdateFinishedTrialError:
            continue
    callback = storage.get_heartbeat_stale_trial_callback()
    for tid in failed:
        frozen = copy.deepcopy(storage.get_trial(tid))
        numbers.append(frozen.number)
        if callback is not None:
            callback(study, frozen)
    return numbers
