"""The worker loop (``exl2opt worker``): many processes on one study, each configuration measured
by exactly one of them.

Every worker (one per GPU, on any number of machines) runs :func:`run_worker` against the same
storage; the storage is the only thing they share. A worker takes a configuration under the
study's claim lock (:class:`~optimizer.study.locks.ClaimLock`): it reads every trial, skips
configurations that are done or RUNNING elsewhere (:func:`~optimizer.study.trials.scan`), and turns
its pick into a RUNNING trial (``enqueue_trial`` + ``ask``) whose heartbeat it records at once.
Because the read and the ask happen under one lock, no two workers run the same configuration.

Which configuration: by default the guided search's pick (:mod:`optimizer.study.guided_shared`): under the same
lock the worker takes in every worker's results, writes the configurations it finds dominated as skipped trials
(once, study-wide) and claims the next one worth measuring; ``exhaustive`` takes every feasible configuration in
load order (and measures the skipped ones of an earlier guided run).

Faults.
    * A worker that dies mid-trial: its trial goes stale (:mod:`optimizer.study.liveness`) and is
      retried by the next free worker, up to ``max_retry`` times, then given up as failed.
    * OOM and other engine errors fail only that trial, with the reason stored; they are final.
    * Ctrl-C / SIGTERM: the current trial is told FAIL with ``reason = "interrupted"`` (it will be
      run again later), everything finished stays.
    * A stopped worker that resumes after its trial was failed as stale gives that trial up (another
      worker has it) and goes on.
    * A worker with nothing left to claim waits while other workers still have RUNNING trials, so a
      trial whose worker dies is retried even at the very end of the study.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optimizer.errors import StorageError
from optimizer.evaldata import EvalText
from optimizer.storage import (
    DEFAULT_ROOT,
    VARIANTS_NAME,
    Heartbeat,
    first_line,
    open_storage,
    safe_url,
    study_dir,
)
from optimizer.study.candidates import Candidate, build_space, config_key_of, distributions
from optimizer.study.guided import Guide
from optimizer.study.guided_shared import SharedGuide, stored_view
from optimizer.study.liveness import (
    fail_stale,
    heartbeat,
    heartbeat_enabled,
    is_storage_error,
    is_taken_over,
    worker_id,
)
from optimizer.study.locks import ClaimLock, lock_dir_for, run_lock_for
from optimizer.study.measure import BackendFactory, RunState, close_engines, load_memos, measure
from optimizer.study.opening import init_study, load_spec, open_study
from optimizer.study.outcome import SearchResult, StudyTally, tally
from optimizer.study.spec import SearchSpec, write_variants
from optimizer.study.trials import (
    DEFAULT_MAX_RETRY,
    Ledger,
    fail_interrupted,
    mark_running,
    record_infeasible,
    scan,
    stamp,
    tell_outside_space,
    tell_reused,
)

if TYPE_CHECKING:  # pragma: no cover
    import optuna

#: Default seconds between two heartbeats of a running trial.
DEFAULT_HEARTBEAT_S = 10
#: Default grace (seconds without heartbeat before a trial is stale): 3 x the interval.
GRACE_FACTOR = 3
#: Attempts (with 1 s, 2 s, 4 s ... back-off) to reach a storage server before giving up.
DEFAULT_CONNECT_ATTEMPTS = 4
#: Seconds a worker sleeps when everything left is RUNNING on other workers.
DEFAULT_POLL_S = 2.0


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
    exhaustive: bool = True,
    gpus: Sequence[str] = (),
) -> SearchResult:
    """Join (or create) ``study_name`` and measure configurations until none is left.

    ``spec`` None: use the spec kept in the study (a worker joining without ``--model``).

    ``exhaustive`` True: configurations are taken in the study's load order (variant-major), each by
    exactly one worker. False: the guided search (:mod:`optimizer.study.guided_shared`; ``gpus`` names
    the GPU model(s) for its speed predictions): only configurations that can reach the front are
    measured, the others stored once as ``skipped`` with predictions and reason. Returns when every
    feasible configuration is finished (measured, failed, given up after stale retries, or skipped),
    after ``n_trials`` GPU trials by this worker, or after ``timeout`` s.

    Raises:
        StorageError: the storage cannot be reached.
        StudyError: the study exists with other settings, or its stored spec is damaged.
        KeyboardInterrupt: Ctrl-C / SIGTERM (the current trial is failed as ``interrupted`` first).
    """
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    say = log or (lambda _m: None)
    t0 = time.monotonic()
    storage = open_storage(study=study_name, url=storage_url, root=root, heartbeat=options.heartbeat,
                           connect_attempts=options.connect_attempts)
    if spec is None:
        spec = load_spec(study_name=study_name, storage=storage, storage_url=storage_url)
    cands = build_space(spec)
    feasible = [c for c in cands if c.verdict.fits]
    feasible_keys = {c.key for c in feasible}
    by_key = {c.key: c for c in cands}
    dists = distributions(cands)
    lock = ClaimLock(study_name=study_name, url=storage_url,
                     lock_dir=lock_dir_for(study_name=study_name, storage_url=storage_url, root=root))
    me = worker_id()
    rlock = run_lock_for(study_name=study_name, storage_url=storage_url, root=root)
    if rlock is not None:
        rlock.acquire(exclusive=False)
    st = RunState()
    shared = None if exhaustive or not feasible else SharedGuide(Guide(feasible, spec, gpus), by_key, dists)
    measured_here = 0
    stop = "exhausted"
    waited_since: float | None = None
    outages = 0
    try:
        with lock.held():
            study = open_study(study_name=study_name, storage=storage, sampler=optuna.samplers.RandomSampler(seed=0))
            init_study(study, spec)
            led = scan(study, max_retry=options.max_retry)
            infeasible = [c for c in cands if not c.verdict.fits and c.key not in led.recorded_infeasible]
            record_infeasible(study, infeasible, dists, {})
        with contextlib.suppress(OSError):
            write_variants(variants=spec.variants, path=study_dir(study=study_name, root=root) / VARIANTS_NAME)
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
                    taken = set(led.done) | set(led.running) | set(st.done)  # st.done: e.g. a passing failure here
                    if shared is None:
                        todo = [c for c in feasible if c.key not in taken]
                    else:
                        nxt = shared.pick(study, led, tried=st.done)
                        todo = [nxt] if nxt is not None else []
                        taken |= shared.skipped
                    claim = _claim(study, storage, led, todo, by_key, dists, spec, taken=taken,
                                   skipped=shared.skipped if shared else set())
                if claim is None:
                    left = feasible_keys - set(led.done) - set(st.done) - (shared.skipped if shared else set())
                    if not left:  # what is left but not claimable runs on other workers
                        stop = "exhausted"
                        break
                    if shared is not None and not left & set(led.running):  # a guard: never wait on nothing
                        say(f"the guided search has nothing to take and nothing runs elsewhere; {len(left)} "
                            "configuration(s) left for a later run")
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
                load_memos(study, st)  # perplexity / speed measured by any worker are reused
                say(f"trial {trial.number}: {cand.key}")
                try:
                    with heartbeat(storage, trial._trial_id):
                        trial.set_user_attr("worker", me)
                        if shared is None:
                            skip = measure(study, trial, cand, spec=spec, st=st, factory=backend_factory, text=text)
                        else:
                            g = shared.guide
                            g.annotate(trial, cand)
                            skip = measure(study, trial, cand, spec=spec, st=st, factory=backend_factory, text=text,
                                           perplexity=g.perplexity(cand, st, trial), place_around=g.place_around(cand))
                            shared.measured_here(cand)
                except Exception as e:
                    if not is_taken_over(e):
                        fail_interrupted(study, [trial])
                        raise
                    say(f"trial {trial.number} was failed as stale while this worker was stopped or cut off, and "
                        "is retried by another worker; this worker gives it up and goes on")
                    continue
                except BaseException:
                    fail_interrupted(study, [trial])
                    raise
                if skip is not None or study._storage.get_trial(trial._trial_id).state == TrialState.COMPLETE:
                    measured_here += 1  # a trial the paired test stopped early ran on the GPU too
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
        close_engines(st)
        lock.close()
        if rlock is not None:
            rlock.release()
    skipped: set[str] = set()
    try:
        if shared is not None:
            skipped = set(stored_view(study)[0]) & feasible_keys
        end = tally(scan(study, max_retry=options.max_retry), feasible_keys - skipped)
    except Exception as e:  # the storage went away at the very end: report what this worker knows
        if not is_storage_error(e):
            raise
        skipped = shared.skipped if shared is not None else set()
        end = StudyTally(measured=st.measured, failed=st.failed,
                         left=len(feasible_keys - skipped) - st.measured - st.failed)
    return SearchResult(
        study_name=study_name, n_feasible=len(feasible), n_infeasible=len(cands) - len(feasible),
        n_measured=st.measured, n_failed=end.failed, n_reused=st.reused, model_loads=st.loads,
        exhausted=stop == "exhausted", seconds=time.monotonic() - t0, stop_reason=stop, study=end,
        n_skipped=len(skipped),
    )


def _where(url: str | None) -> str:
    return f" {safe_url(url)}" if url else ""


def _claim(study: optuna.Study, storage: Any, led: Ledger, todo: list[Candidate], by_key: dict[str, Candidate],
           dists: dict[str, Any], spec: SearchSpec, *, taken: set[str],
           skipped: set[str]) -> tuple[Any, Candidate] | None:
    """Under the claim lock: turn the next configuration to take (``todo[0]``) into a RUNNING trial of ours.

    WAITING trials (stale retries, leftovers) are popped first; one that names a configuration in
    ``taken`` (finished, running, tried here, or skipped by the guided search) is settled at once as
    ``reused`` (no GPU).
    """
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
        key = config_key_of(trial.params, spec.split)
        cand = by_key.get(key)
        stamp(trial)
        if cand is None:
            tell_outside_space(study, trial, key)
        elif not cand.verdict.fits or key in taken:
            tell_reused(study, trial, cand, led.done.get(key),
                        reason="skipped by the guided search" if key in skipped else None)
        else:
            mark_running(trial, cand)
            return trial, cand
    return None
