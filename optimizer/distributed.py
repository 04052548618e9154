"""Many workers on one study: exactly-once claims, heartbeats, stale-trial retries, clean stops.

Every worker (``exl2opt worker``, one per GPU, on any number of machines) runs :func:`run_worker`
against the same storage. The storage is the only thing they share.

Claims. A worker takes a configuration under a *claim lock* (PostgreSQL: ``pg_advisory_lock`` on a
key derived from the study name; MySQL: ``GET_LOCK``; journal / SQLite on one machine: ``flock`` on
``<study dir>/claims.lock``). Under the lock it reads every trial, skips configurations that are
finished or RUNNING elsewhere, and turns its pick into a RUNNING trial (``enqueue_trial`` + ``ask``)
whose heartbeat it records at once. Because the read and the ask happen under one lock, no two
workers ever run the same configuration. The lock is held for milliseconds, never during a
measurement; a worker killed while holding it releases it (the server drops a dead session's
advisory locks; the kernel drops a dead process's ``flock``).

Faults.
    * Heartbeats (RDB storages only; Optuna's ``RDBStorage(heartbeat_interval, grace_period)``): a
      thread records the trial's heartbeat every ``heartbeat_interval`` s while it is measured.
      Optuna's own heartbeat runs only inside ``study.optimize``; the study here uses ask/tell, so
      this module runs the equivalent thread itself and sweeps stale trials before every claim.
      A trial silent for more than ``grace_period`` s (its worker was SIGKILLed, lost power or
      network) is failed with ``reason = "stale"`` and re-enqueued once by
      ``RetryHeartbeatStaleTrialCallback(max_retry=1)``; the next free worker runs the retry. A
      configuration that went stale more than ``max_retry`` times is given up (it is probably what
      kills the worker) and counts as failed.
    * Journal storage has no heartbeat: RUNNING trials of dead processes *on this host* are failed
      by :func:`optimizer.storage.sweep_stale` (by pid), then retried the same way.
    * OOM and other engine errors fail only that trial, with the reason stored; they are final (the
      same settings are not run again by any worker).
    * Ctrl-C / SIGTERM: the current trial is told FAIL with ``reason = "interrupted"`` (it will be
      run again later), everything finished stays, the worker exits with code 130.
    * A worker with nothing left to claim waits while other workers still have RUNNING trials, so a
      trial whose worker dies is retried even at the very end of the study.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import functools
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optimizer.errors import StorageError
from optimizer.evaldata import EvalText
from optimizer.storage import (
    DEFAULT_ROOT,
    VARIANTS_NAME,
    Heartbeat,
    engine_kwargs,
    first_line,
    open_storage,
    safe_url,
    study_dir,
    sweep_stale,
    this_host,
)

if TYPE_CHECKING:  # pragma: no cover
    import optuna

    from optimizer.study import BackendFactory, Candidate, SearchResult, SearchSpec

#: Default seconds between two heartbeats of a running trial.
DEFAULT_HEARTBEAT_S = 10
#: Default grace (seconds without heartbeat before a trial is stale): 3 x the interval.
GRACE_FACTOR = 3
#: Times a stale configuration is re-run before it is given up.
DEFAULT_MAX_RETRY = 1
#: Attempts (with 1 s, 2 s, 4 s ... back-off) to reach a storage server before giving up.
DEFAULT_CONNECT_ATTEMPTS = 4
#: Seconds a worker sleeps when everything left is RUNNING on other workers.
DEFAULT_POLL_S = 2.0

STALE = "stale"
INTERRUPTED = "interrupted"


@dataclass(frozen=True)
class WorkerOptions:
    """Fault-handling knobs of a worker (seconds unless stated)."""

    heartbeat_interval: int = DEFAULT_HEARTBEAT_S
    grace_period: int | None = None  # None: GRACE_FACTOR x heartbeat_interval
    max_retry: int = DEFAULT_MAX_RETRY
    poll_s: float = DEFAULT_POLL_S
    connect_attempts: int = DEFAULT_CONNECT_ATTEMPTS
    #: stop waiting for other workers' RUNNING trials after this long (None: wait until they end)
    wait_limit_s: float | None = None

    @property
    def grace(self) -> int:
        return self.grace_period if self.grace_period is not None else GRACE_FACTOR * self.heartbeat_interval

    @property
    def heartbeat(self) -> Heartbeat:
        return Heartbeat(interval=self.heartbeat_interval, grace=self.grace, max_retry=self.max_retry)


# ----- storage ----------------------------------------------------------------------------------


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


def _where(url: str | None) -> str:
    return f" {safe_url(url)}" if url else ""


def heartbeat_enabled(storage: Any) -> bool:
    from optuna.storages._heartbeat import is_heartbeat_enabled

    return bool(is_heartbeat_enabled(storage))


# ----- claim lock --------------------------------------------------------------------------------


class ClaimLock:
    """A lock shared by every worker of one study (see module docstring). Re-entrant per process."""

    def __init__(self, *, study_name: str, url: str | None, lock_dir: Path) -> None:
        self._study_name = study_name
        self._url = url
        self._lock_dir = lock_dir
        self._engine: Any = None
        self._conn: Any = None
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
        if self._conn is None:
            import sqlalchemy
            from sqlalchemy.pool import NullPool

            assert self._url is not None
            self._engine = sqlalchemy.create_engine(self._url, poolclass=NullPool,
                                                    **{k: v for k, v in engine_kwargs(self._url).items()
                                                       if k == "connect_args"})
            self._conn = self._engine.connect()
        return self._conn

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
            if self.kind == "postgresql" and self._conn is not None:
                self._conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": self._key})
                self._conn.commit()
            elif self.kind == "mysql" and self._conn is not None:
                self._conn.execute(sqlalchemy.text("SELECT RELEASE_LOCK(:k)"), {"k": f"exl2opt:{self._study_name}"[:64]})
                self._conn.commit()
            elif self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
                self._fd = None
        except Exception:  # a lost connection releases the server-side lock by itself
            self._drop()

    def _drop(self) -> None:
        with contextlib.suppress(Exception):
            if self._conn is not None:
                self._conn.close()
        with contextlib.suppress(Exception):
            if self._engine is not None:
                self._engine.dispose()
        self._conn = self._engine = None
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
    configurations twice. The kernel drops the lock when its process dies. Database storages
    (PostgreSQL, MySQL) are coordinated by :class:`ClaimLock` instead and need no run lock.
    """

    def __init__(self, *, lock_dir: Path, study_name: str) -> None:
        self._path = lock_dir / "run.lock"
        self._study = study_name
        self._held = False

    def acquire(self, *, exclusive: bool) -> RunLock:
        from optimizer.errors import StudyError

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
            if exclusive:
                raise StudyError(
                    f"study {self._study!r} is already being run by another exl2opt process on this machine; wait "
                    f"for it, or add a cooperating process with `exl2opt worker --study {self._study}`") from None
            raise StudyError(
                f"study {self._study!r} is being run by `exl2opt search` on this machine; wait for it to finish "
                "(workers can join a study only when no single-process search is running it)") from None
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


def run_lock_for(*, study_name: str, storage_url: str | None, root: Path = DEFAULT_ROOT) -> RunLock | None:
    """A :class:`RunLock` for embedded storages (None for database servers)."""
    if storage_url is not None and not storage_url.startswith("sqlite:"):
        return None
    return RunLock(lock_dir=study_dir(study=study_name, root=root), study_name=study_name)


# ----- heartbeat ---------------------------------------------------------------------------------


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


# ----- ledger --------------------------------------------------------------------------------------


@dataclass
class Ledger:
    """What the storage says about every configuration (by config key)."""

    done: dict[str, dict[str, Any]] = field(default_factory=dict)
    running: dict[str, int] = field(default_factory=dict)  # key -> trial number
    stale: dict[str, int] = field(default_factory=dict)  # key -> times it went stale
    waiting: int = 0
    recorded_infeasible: set[str] = field(default_factory=set)


def scan(study: optuna.Study, *, max_retry: int) -> Ledger:
    """Read every trial once and classify its configuration."""
    from optuna.trial import TrialState

    from optimizer.study import CONSTRAINT

    led = Ledger()
    for t in study.get_trials(deepcopy=False):
        ua = t.user_attrs
        key = ua.get("config_key")
        if t.state == TrialState.WAITING:
            led.waiting += 1
            continue
        if not key:
            continue
        status, reason = ua.get("status"), ua.get("reason")
        if t.state == TrialState.RUNNING:
            led.running[key] = t.number
        elif t.state == TrialState.COMPLETE and status in ("measured", "infeasible"):
            if status == "infeasible":
                led.recorded_infeasible.add(key)
            if key not in led.done or status == "measured":
                led.done[key] = {"config_key": key, "values": list(t.values or []), "status": status,
                                 "constraint": t.constraints.get(CONSTRAINT, 0.0) if t.constraints else 0.0,
                                 "number": t.number}
        elif t.state == TrialState.FAIL:
            if reason == STALE or status == "running":
                led.stale[key] = led.stale.get(key, 0) + 1
            elif status == "failed" and reason != INTERRUPTED and ua.get("retry") is not True:
                led.done.setdefault(key, {"config_key": key, "values": None, "status": "failed",
                                          "reason": reason, "number": t.number})
    for key, n in led.stale.items():
        if n > max_retry and key not in led.done and key not in led.running:
            led.done[key] = {"config_key": key, "values": None, "status": "failed",
                             "reason": f"its worker died {n} times while measuring it (given up)"}
    return led


# ----- spec kept in the study -----------------------------------------------------------------------


def spec_record(spec: SearchSpec) -> dict[str, Any]:
    """JSON that rebuilds ``spec`` on another machine (variants as metadata only; no token)."""
    from dataclasses import asdict

    from optimizer.study import variant_record

    return {
        "variants": [variant_record(v) for v in spec.variants],
        "budget": {"per_device": list(spec.budget.per_device),
                   "overhead": list(spec.budget.overhead) if spec.budget.overhead is not None else None},
        "split": asdict(spec.split),
        "contexts": list(spec.contexts) if spec.contexts is not None else None,
        "caches": list(spec.caches) if spec.caches is not None else None,
        "min_ctx": spec.min_ctx,
        "runtime": asdict(spec.runtime),
        "eval_protocol": asdict(spec.eval_protocol),
        "speed_protocol": asdict(spec.speed_protocol),
    }


def spec_from_record(rec: dict[str, Any]) -> SearchSpec:
    from optimizer.backends.base import EvalProtocol, SpeedProtocol
    from optimizer.formats import RuntimeOptions
    from optimizer.space import Budget
    from optimizer.study import SearchSpec, variant_from_record
    from optimizer.vram import Split

    sp = dict(rec["split"])
    for k in ("gpu_split", "reserve_bytes"):
        sp[k] = tuple(sp.get(k) or ())
    ov = rec["budget"].get("overhead")
    return SearchSpec(
        variants=tuple(variant_from_record(v) for v in rec["variants"]),
        budget=Budget(per_device=tuple(rec["budget"]["per_device"]), overhead=tuple(ov) if ov is not None else None),
        split=Split(**sp),
        contexts=tuple(rec["contexts"]) if rec.get("contexts") is not None else None,
        caches=tuple(rec["caches"]) if rec.get("caches") is not None else None,
        min_ctx=int(rec.get("min_ctx", 0)),
        runtime=RuntimeOptions(**rec["runtime"]),
        eval_protocol=EvalProtocol(**rec["eval_protocol"]),
        speed_protocol=SpeedProtocol(**rec["speed_protocol"]),
    )


SPEC_ATTR = "spec"


def load_spec(*, study_name: str, storage: Any, storage_url: str | None) -> SearchSpec:
    """The search spec stored by the worker or search that created the study.

    ``storage`` is the opened storage of ``storage_url`` (the URL only names it in messages).

    Raises:
        StudyError: no such study, or it was created without a stored spec.
    """
    import optuna

    from optimizer.errors import StudyError

    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        raise StudyError(f"no study named {study_name!r} in {safe_url(storage_url) if storage_url else 'the journal'}"
                         "; start it with `exl2opt worker --model ...` or `exl2opt search`") from None
    rec = study.user_attrs.get(SPEC_ATTR)
    if not isinstance(rec, dict):
        raise StudyError(f"study {study_name!r} holds no search settings (it was made by an older exl2opt or "
                         "by plain `exl2opt search`); give the worker the same --model/--vram/... options")
    return spec_from_record(rec)


# ----- the worker ---------------------------------------------------------------------------------


def worker_id() -> str:
    """``host:pid[:gpu]`` of this process (``gpu`` = CUDA_VISIBLE_DEVICES when set)."""
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"{this_host()}:{os.getpid()}" + (f":gpu{gpu}" if gpu else "")


def run_worker(
    *,
    spec: SearchSpec | None,
    study_name: str,
    backend_factory: BackendFactory,
    eval_text: Callable[[], EvalText],
    storage_url: str | None = None,
    root: Path = DEFAULT_ROOT,
    n_trials: int | None = None,
    timeout: float | None = None,
    options: WorkerOptions = WorkerOptions(),
    progress: Any = None,
    log: Callable[[str], None] | None = None,
) -> SearchResult:
    """Join (or create) ``study_name`` and measure configurations until none is left.

    ``spec`` None: use the spec kept in the study (a worker joining without ``--model``).

    Configurations are taken in the study's load order (variant-major), each by exactly one
    worker. Returns when every feasible configuration is finished (measured, failed, or given up
    after stale retries), after ``n_trials`` measurements by this worker, or after ``timeout`` s.

    Raises:
        StorageError: the storage cannot be reached.
        StudyError: the study exists with other settings.
        KeyboardInterrupt: Ctrl-C / SIGTERM (the current trial is failed as ``interrupted`` first).
    """
    import optuna
    from optuna.trial import TrialState

    from optimizer import study as S

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    say = log or (lambda _m: None)
    t0 = time.monotonic()
    storage = open_storage(study=study_name, url=storage_url, root=root, heartbeat=options.heartbeat,
                           connect_attempts=options.connect_attempts)
    if spec is None:
        spec = load_spec(study_name=study_name, storage=storage, storage_url=storage_url)
    cands = S.build_space(spec)
    feasible = [c for c in cands if c.verdict.fits]
    feasible_keys = {c.key for c in feasible}
    by_key = {c.key: c for c in cands}
    dists = S.distributions(cands)
    lock = ClaimLock(study_name=study_name, url=storage_url, lock_dir=study_dir(study=study_name, root=root))
    me = worker_id()
    rlock = run_lock_for(study_name=study_name, storage_url=storage_url, root=root)
    if rlock is not None:
        rlock.acquire(exclusive=False)
    st = S._State()
    measured_here = 0
    stop = "exhausted"
    waited_since: float | None = None
    outages = 0
    try:
        with lock.held():
            study = S.open_study(study_name=study_name, storage=storage,
                                 sampler=optuna.samplers.RandomSampler(seed=0))
            S.init_study(study, spec)
            led = scan(study, max_retry=options.max_retry)
            infeasible = [c for c in cands if not c.verdict.fits and c.key not in led.recorded_infeasible]
            S._record_infeasible(study, infeasible, dists, S._State())
        with contextlib.suppress(OSError):
            S.write_variants(variants=spec.variants, path=study_dir(study=study_name, root=root) / VARIANTS_NAME)
        text = functools.cache(eval_text)

        while True:
            if n_trials is not None and measured_here >= n_trials:
                stop = "n_trials"
                break
            if timeout is not None and time.monotonic() - t0 >= timeout:
                stop = "timeout"
                break
            try:
                with lock.held():
                    swept = fail_stale(study, storage)
                    if swept:
                        say(f"failed stale trial(s) {swept} (no heartbeat); they will be retried")
                    led = scan(study, max_retry=options.max_retry)
                    claim = _claim(study, storage, led, feasible, by_key, dists, spec)
                if claim is None:
                    left = feasible_keys - set(led.done)
                    if not left:
                        stop = "exhausted"
                        break
                    # everything left runs on other workers: wait for them (or for them to go stale)
                    waited_since = waited_since or time.monotonic()
                    if options.wait_limit_s is not None and time.monotonic() - waited_since > options.wait_limit_s:
                        stop = "waiting"
                        break
                    time.sleep(options.poll_s)
                    continue
                waited_since = None
                trial, cand = claim
                S._load_history(study, st)  # perplexity / speed measured by any worker are reused
                say(f"trial {trial.number}: {cand.key}")
                try:
                    with heartbeat(storage, trial._trial_id):
                        trial.set_user_attr("worker", me)
                        S._measure(study, trial, cand, spec, st, backend_factory, text)
                except BaseException:
                    _fail_if_running(study, trial, INTERRUPTED)
                    raise
                if study._storage.get_trial(trial._trial_id).state == TrialState.COMPLETE:
                    measured_here += 1
                if progress is not None:
                    progress(trial.number, cand)
            except KeyboardInterrupt:
                raise
            except Exception as e:
                if not is_storage_error(e):
                    raise
                outages += 1
                if outages >= max(options.connect_attempts, 1):
                    raise StorageError(
                        f"lost the study storage{_where(storage_url)} ({type(e).__name__}: {first_line(e)}); gave up "
                        f"after {outages} attempt(s). A trial left RUNNING is failed as stale and retried by the "
                        "next worker once the storage is back; restart this worker then") from None
                lock.close()
                delay = min(2.0 ** (outages - 1), 30.0)
                say(f"storage error ({type(e).__name__}: {first_line(e)}); retrying in {delay:.0f} s")
                time.sleep(delay)
                continue
            outages = 0
    finally:
        S.close_engines(st)
        lock.close()
        if rlock is not None:
            rlock.release()
    try:
        done = scan(study, max_retry=options.max_retry).done
    except Exception as e:  # the storage went away at the very end: report what this worker knows
        if not is_storage_error(e):
            raise
        done = {}
    n_failed = sum(1 for k, d in done.items() if k in feasible_keys and d["status"] == "failed")
    return S.SearchResult(
        study_name=study_name, n_feasible=len(feasible), n_infeasible=len(cands) - len(feasible),
        n_measured=st.measured, n_failed=n_failed, n_reused=st.reused, model_loads=st.loads,
        exhausted=stop == "exhausted", seconds=time.monotonic() - t0, stop_reason=stop,
    )


def _fail_if_running(study: optuna.Study, trial: Any, reason: str) -> None:
    from optuna.trial import TrialState

    with contextlib.suppress(Exception):
        if study._storage.get_trial(trial._trial_id).state == TrialState.RUNNING:
            trial.set_user_attr("status", "failed")
            trial.set_user_attr("reason", reason)
            study.tell(trial, state=TrialState.FAIL)


def _claim(study: optuna.Study, storage: Any, led: Ledger, feasible: list[Candidate],
           by_key: dict[str, Candidate], dists: dict[str, Any], spec: SearchSpec) -> tuple[Any, Candidate] | None:
    """Under the claim lock: turn the next free configuration into a RUNNING trial of ours.

    WAITING trials (stale retries, leftovers) are popped first; one that names a finished or
    running configuration is settled at once as ``reused`` (no GPU).
    """
    from optimizer import study as S

    taken = set(led.done) | set(led.running)
    todo = [c for c in feasible if c.key not in taken]
    waiting = led.waiting
    for _ in range(waiting + 2):
        if waiting <= 0 and not todo:
            return None
        if waiting <= 0:
            study.enqueue_trial(todo[0].params, skip_if_exists=False)
        trial = study.ask(dists)
        waiting = max(waiting - 1, 0)
        if heartbeat_enabled(storage):
            with contextlib.suppress(Exception):
                storage.record_heartbeat(trial._trial_id)
        key = S.config_key_of(trial.params, spec.split)
        cand = by_key.get(key)
        S._stamp(trial)
        if cand is None:
            S.tell_outside_space(study, trial, key)
        elif not cand.verdict.fits or key in taken:
            S._tell_reused(study, trial, cand, led.done.get(key))
        else:
            S.mark_running(trial, cand)
            return trial, cand
    return None


__all__ = [
    "ClaimLock", "Ledger", "WorkerOptions", "fail_stale", "heartbeat", "load_spec",
    "run_worker", "safe_url", "scan", "spec_from_record", "spec_record",
]
