"""The single-process study loop (``exl2opt search``): measure the feasible configurations, once
each, with as few model loads as possible.

Objectives (``study.directions``): **perplexity** (minimize), **generation tokens/s** (maximize) and
**max_seq_len** (maximize). Context length is an objective, not only a floor: a bigger cache is a
real benefit that costs VRAM, so the front shows the trade-off. ``--min-ctx`` is a floor applied
before the search (configurations below it are not part of the space). Because speed is measured
at a fixed context fill (see :class:`~optimizer.backends.base.SpeedProtocol`), a (variant, cache,
split) shares perplexity and speed across contexts, and on the front it appears at the largest
context that fits, unless a smaller one is measured faster.

Constraint: every trial carries ``vram_excess_gib`` (feasible <=> <= 0): the predicted excess of the
worst device for configurations the VRAM model rejects (they are **never loaded**, recorded up front
with dominated placeholder values, their breakdown and reason, so no sampler stalls on them; see
optuna-notes §2.4), and for measured ones the measured excess (:mod:`optimizer.study.measure`).

No configuration is measured twice: finished results (also from earlier runs of the same study)
are reused, duplicates proposed by a sampler get the stored values, and the study stops when every
feasible configuration has a result (the done rule of :mod:`optimizer.study.trials`). Trials asked
from a sampler that hit an infeasible or already-measured configuration cost no GPU time and do
not count against ``n_trials``. A study on a database server with an enumerating sampler runs
through the workers' claim protocol (:mod:`optimizer.study.worker_loop`).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optimizer.evaldata import EvalText
from optimizer.storage import DEFAULT_ROOT, VARIANTS_NAME, study_dir, sweep_stale
from optimizer.study.candidates import Candidate, build_space, config_key_of, distributions
from optimizer.study.eta import eta_text
from optimizer.study.guided import Guide, record_skipped
from optimizer.study.guided_shared import stored_view
from optimizer.study.locks import run_lock_for
from optimizer.study.measure import BackendFactory, RunState, close_engines, load_memos, measure
from optimizer.study.opening import init_study, open_study
from optimizer.study.outcome import SearchResult, tally
from optimizer.study.samplers import ASK_BATCH, choose_mode, make_sampler
from optimizer.study.spec import SearchSpec, write_variants
from optimizer.study.trials import (
    fail_interrupted,
    mark_running,
    record_infeasible,
    running_keys,
    scan,
    stamp,
    tell_outside_space,
    tell_reused,
)
from optimizer.study.worker_loop import run_worker

if TYPE_CHECKING:  # pragma: no cover
    import optuna


def run(
    *,
    spec: SearchSpec,
    study_name: str,
    backend_factory: BackendFactory,
    eval_text: Callable[[], EvalText],
    storage_url: str | None = None,
    root: Path = DEFAULT_ROOT,
    n_trials: int | None = None,
    timeout: float | None = None,
    sampler: str = "auto",
    seed: int | None = 0,
    progress: Any = None,
    exhaustive: bool = True,
    gpus: Sequence[str] = (),
) -> SearchResult:
    """Run (or resume) the study ``study_name`` until the space is exhausted, ``n_trials`` GPU
    trials ran, or ``timeout`` seconds passed.

    ``backend_factory(variant)`` returns the backend for a variant's format (only called for
    variants that are measured). ``eval_text()`` is called once, lazily, before the first
    perplexity. ``progress`` is an optional ``rich.progress.Progress``.

    ``exhaustive`` False runs the prediction-guided search (:mod:`optimizer.study.guided`): only
    configurations that can reach the front are measured, the others are stored as ``skipped`` with
    their predictions and reason; ``gpus`` names the GPU model(s) for the speed predictions.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if storage_url is not None and not storage_url.startswith("sqlite:") and sampler in ("auto", "bruteforce"):
        # a database server shared with other machines: take configurations through the workers'
        # claim protocol (exactly once each, heartbeats, stale retries)
        return run_worker(spec=spec, study_name=study_name, backend_factory=backend_factory,
                          eval_text=eval_text, storage_url=storage_url, root=root,
                          n_trials=n_trials, timeout=timeout, exhaustive=exhaustive, gpus=gpus)
    run_lock = run_lock_for(study_name=study_name, storage_url=storage_url, root=root)
    if run_lock is not None:  # a second search on this embedded study is refused with one line
        run_lock.acquire(exclusive=True)
    t0 = time.monotonic()
    cands = build_space(spec)
    feasible = [c for c in cands if c.verdict.fits]
    by_key = {c.key: c for c in cands}
    dists = distributions(cands)
    pre_mode = choose_mode(sampler=sampler, n_todo=len(feasible), n_trials=n_trials)
    opt_sampler = make_sampler("tpe" if pre_mode == "enumerate" else pre_mode, seed=seed)
    study = open_study(study_name=study_name, storage_url=storage_url, root=root, sampler=opt_sampler)
    init_study(study, spec)
    write_variants(variants=spec.variants, path=study_dir(study=study_name, root=root) / VARIANTS_NAME)
    sweep_stale(study)

    st = RunState(done=scan(study).done)
    load_memos(study, st)
    record_infeasible(study, [c for c in cands if not c.verdict.fits], dists, st.done)

    todo = [c for c in feasible if c.key not in st.done]
    mode = choose_mode(sampler=sampler, n_todo=len(todo), n_trials=n_trials)
    guide = None if exhaustive or not todo else Guide(feasible, spec, gpus)
    if guide is not None:
        mode = "enumerate"
        skips, windows = stored_view(study)
        guide.windows.update(windows)  # earlier runs' per-window NLLs: references of the paired test
        # results of earlier runs of this study anchor the predictions (one refit on all of them, then the prune)
        guide.observe_all([(c, st.done[c.key]) for c in feasible if c.key in st.done])
        for key, reason in skips.items():  # skipped by an earlier run: not written again
            if key in guide.by_key and key not in st.done:
                guide.adopt(key, reason)
    text = functools.cache(eval_text)  # loaded once, before the first perplexity
    task = progress.add_task("trials", total=min(len(todo), n_trials or len(todo))) if progress else None
    rank = {c.key: i for i, c in enumerate(cands)}
    gpu_trials = 0
    eta = [""]  # " · N left, ETA ..." from the phase timings so far, shown with every phase
    stop = "exhausted"
    pending: list[Any] = []
    try:
        while True:
            todo = [c for c in todo if c.key not in st.done]
            if not todo:
                stop = "exhausted" if feasible else "nothing_fits"
                break
            if n_trials is not None and gpu_trials >= n_trials:
                stop = "n_trials"
                break
            if timeout is not None and time.monotonic() - t0 >= timeout:
                stop = "timeout"
                break
            limit = ASK_BATCH if n_trials is None else max(min(ASK_BATCH, n_trials - gpu_trials), 1)
            if mode == "enumerate":
                busy = running_keys(study, spec.split)
                free = [c for c in todo if c.key not in busy]
                if not free:  # everything left is being measured by another worker
                    stop = "others_running"
                    break
                if guide is not None:
                    record_skipped(study, guide.new_skips(), by_key, dists)
                    nxt = guide.next(free)
                    if nxt is None:  # everything left is dominated by measured points
                        break
                    free = [nxt]
                trial = _ask_fixed(study, free[0], dists)
                key = config_key_of(trial.params, spec.split)
                got = by_key.get(key)
                # a leftover WAITING trial (an earlier run stopped between enqueue and ask) or one
                # another process enqueued: settle it without the GPU unless it is new work
                if got is None:
                    tell_outside_space(study, trial, key)
                    continue
                if key in st.done or (key != free[0].key and key in busy):
                    tell_reused(study, trial, got, st.done.get(key))
                    st.reused += 1
                    continue
                trials, batch = [trial], [got]
            else:
                trials, batch = _ask_batch(study, dists, by_key, st, spec, todo, limit)
            pending = list(trials)  # asked (RUNNING) but not yet measured: failed if the run stops early
            for trial, cand in sorted(zip(trials, batch, strict=False), key=lambda tc: rank[tc[1].key]):
                def say(phase: str, c: Candidate = cand) -> None:
                    if progress is not None:
                        progress.update(task, description=f"{c.config.variant.label} {c.config.cache} "
                                                          f"ctx {c.config.max_seq_len}: {phase}{eta[0]}")

                pending.remove(trial)
                mark_running(trial, cand)
                if guide is None:
                    measure(study, trial, cand, spec=spec, st=st, factory=backend_factory, text=text, say=say)
                else:
                    guide.annotate(trial, cand)
                    skip = measure(study, trial, cand, spec=spec, st=st, factory=backend_factory, text=text, say=say,
                                   perplexity=guide.perplexity(cand, st, trial), place_around=guide.place_around(cand))
                    guide.observe(cand, st.done.get(cand.key), skip)
                gpu_trials += 1
                left = [c for c in todo if c.key not in st.done and c.key not in (guide.reported if guide else ())]
                eta[0] = eta_text(left if n_trials is None else left[:max(n_trials - gpu_trials, 0)], spec=spec, times=st.times,
                                  ppl_done=set(st.ppl), speed_done=set(st.speed), dataset_id=st.dataset_id, loaded=st.loaded,
                                  at_most=guide is not None)
                if progress is not None:
                    progress.advance(task)
                    say("measured")
        if guide is not None:
            record_skipped(study, guide.new_skips(), by_key, dists)
    except BaseException:
        fail_interrupted(study, pending)
        raise
    finally:
        close_engines(st)
        if run_lock is not None:
            run_lock.release()
    return SearchResult(
        study_name=study_name, n_feasible=len(feasible), n_infeasible=len(cands) - len(feasible),
        n_measured=st.measured, n_failed=st.failed, n_reused=st.reused, model_loads=st.loads,
        n_skipped=len(guide.reported) if guide is not None else 0,
        exhausted=stop in ("exhausted", "nothing_fits"), seconds=time.monotonic() - t0, stop_reason=stop,
        study=tally(scan(study), {c.key for c in feasible} - (guide.reported if guide is not None else set())),
    )


def _ask_fixed(study: optuna.Study, cand: Candidate, dists: dict[str, Any]) -> Any:
    """Ask for ``cand``; a WAITING trial left in the storage is taken first (the caller settles it
    when it is not new work), so no enqueued trial is left behind."""
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        study.enqueue_trial(cand.params)
    trial = study.ask(dists)
    stamp(trial)  # at once: a RUNNING trial without host/pid could never be swept
    if trial.params != cand.params:  # another worker took our enqueued trial; run what we got
        trial.set_user_attr("note", "enqueued params differed")
    return trial


def _ask_batch(study: optuna.Study, dists: dict[str, Any], by_key: dict[str, Candidate], st: RunState,
               spec: SearchSpec, todo: list[Candidate], limit: int) -> tuple[list[Any], list[Candidate]]:
    """Ask up to ``limit`` new configurations from the sampler; settle non-GPU asks on the spot.

    ``limit`` is how many GPU trials may still run. Asks that land on an infeasible, out-of-space
    or finished configuration are told at once (no GPU).
    If a whole round of asks brings nothing new, the next configuration in load order is enqueued,
    so the search always progresses.
    """
    trials: list[Any] = []
    batch: list[Candidate] = []
    taken: set[str] = set()
    for _ in range(limit * 4):
        if len(trials) >= limit:
            break
        trial = study.ask(dists)
        key = config_key_of(trial.params, spec.split)
        cand = by_key.get(key)
        stamp(trial)
        if cand is None:
            tell_outside_space(study, trial, key)
        elif key in st.done or key in taken:
            tell_reused(study, trial, cand, st.done.get(key))
            st.reused += 1
        else:
            trials.append(trial)
            batch.append(cand)
            taken.add(key)
    if not trials:
        cand = todo[0]
        trials, batch = [_ask_fixed(study, cand, dists)], [cand]
    return trials, batch
