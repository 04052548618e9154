"""The Optuna study: measure the feasible configurations, once each, with as few model loads as possible.

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
optuna-notes §2.4), and for measured ones the worst device's measured peak allocation plus the
predicted CUDA-context overhead, minus its budget.

Structure used to save GPU time:
    * perplexity is memoized by (variant, cache mode, eval protocol fitted to the context): not by
      split, nor by context once the context holds the whole eval window;
    * speed by (variant, cache mode, split, effective context fill);
    * work is ordered variant-major, then cache mode, then context *descending*, so an engine can
      keep the model and rebuild only the cache (single GPU: each variant is loaded once; a manual
      split is placed by ``config.max_seq_len`` and autosplit around the cache, so those reload per
      context / cache size);
    * no configuration is measured twice: finished results (also from earlier runs of the same
      study) are reused, duplicates proposed by a sampler get the stored values, and the study stops
      when every feasible configuration has a result.

Samplers (``sampler=``): ``bruteforce`` enumerates every feasible configuration in the order above;
``auto`` does that when the feasible set fits ``n_trials`` and otherwise uses ``tpe``
(``TPESampler(multivariate=True)``, asked in batches of 4 that are sorted to share loads); ``gp`` is
``GPSampler``. Trials asked from a sampler that hit an infeasible or already-measured configuration
cost no GPU time and do not count against ``n_trials``.

Trial user attributes (all JSON): ``config_key, variant, format, label, bits, head_bits, split,
cache, max_seq_len, status`` (measured | reused | infeasible | outside_space | failed), ``reason``,
``predicted`` (per-device breakdown, bytes), ``measured`` (per-device peak/used, bytes),
``perplexity, gen_tok_s, prompt_tok_s, context_fill, ppl_key, speed_key, model_loaded, host, pid``.
A failed trial keeps ``perplexity``/``ppl_key`` when only a later phase (speed) failed, so later runs
reuse it; ``retry: true`` marks a failure by an unexpected error (a bug), measured again next run
like ``interrupted`` and ``stale`` ones, while engine failures (``oom``, invalid results) are final.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optimizer.backends.base import (
    Backend,
    Engine,
    EvalProtocol,
    LoadSpec,
    SpeedProtocol,
)
from optimizer.errors import EngineError, EngineOOMError, StorageError, StudyError
from optimizer.evaldata import EvalText
from optimizer.formats import RuntimeOptions
from optimizer.space import Budget, Configuration, enumerate_configs, evaluate
from optimizer.storage import (
    DEFAULT_ROOT,
    VARIANTS_NAME,
    first_line,
    open_storage,
    study_dir,
    sweep_stale,
    this_host,
)
from optimizer.variant import Location, TensorInfo, Variant
from optimizer.vram import GIB, Split, VramVerdict

if TYPE_CHECKING:  # pragma: no cover
    import optuna

METRIC_NAMES = ("perplexity", "gen_tok_s", "max_seq_len")
CONSTRAINT = "vram_excess_gib"
#: Placeholder objective values of configurations that are not measured (dominated by any real one).
PLACEHOLDER_PPL = 1.0e4
SAMPLERS = ("auto", "tpe", "bruteforce", "gp")
ASK_BATCH = 4

BackendFactory = Callable[[Variant], Backend]


@dataclass(frozen=True)
class SearchSpec:
    """Everything that defines the search space and the measurement protocols."""

    variants: tuple[Variant, ...]
    budget: Budget
    split: Split
    contexts: tuple[int, ...] | None = None
    caches: tuple[str, ...] | None = None
    min_ctx: int = 0
    runtime: RuntimeOptions = RuntimeOptions()
    eval_protocol: EvalProtocol = EvalProtocol()
    speed_protocol: SpeedProtocol = SpeedProtocol()

    def fingerprint(self) -> str:
        """What must not change when a study is resumed."""
        return json.dumps({
            "variants": sorted(v.key for v in self.variants),
            "budget": [list(self.budget.per_device), list(self.budget.overhead or ())],
            "split": self.split.label, "contexts": list(self.contexts or ()), "caches": list(self.caches or ()),
            "min_ctx": self.min_ctx, "runtime": asdict(self.runtime),
            "eval": self.eval_protocol.key, "speed": self.speed_protocol.key,
        }, sort_keys=True)


@dataclass(frozen=True)
class Candidate:
    """A configuration of the space with its predicted memory."""

    config: Configuration
    verdict: VramVerdict

    @property
    def key(self) -> str:
        return self.config.key

    @property
    def params(self) -> dict[str, Any]:
        return {"variant": self.config.variant.key, "cache": self.config.cache, "max_seq_len": self.config.max_seq_len}


@dataclass(frozen=True)
class SearchResult:
    """Counts of one :func:`run`. ``model_loads`` counts engine model loads in this run."""

    study_name: str
    n_feasible: int
    n_infeasible: int
    n_measured: int
    n_failed: int
    n_reused: int
    model_loads: int
    exhausted: bool
    seconds: float
    stop_reason: str


@dataclass
class _State:
    """Mutable bookkeeping of one run."""

    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # config key -> user attrs of finished
    ppl: dict[str, float] = field(default_factory=dict)
    speed: dict[str, tuple[float, float, int]] = field(default_factory=dict)
    tokens: dict[str, Sequence[int]] = field(default_factory=dict)
    engines: dict[str, Engine] = field(default_factory=dict)
    active: str | None = None
    loads: int = 0
    measured: int = 0
    failed: int = 0
    reused: int = 0


# ----- space -----------------------------------------------------------------------------------


def build_space(spec: SearchSpec) -> list[Candidate]:
    """Every configuration of ``spec`` at or above ``min_ctx``, predicted, in measurement order."""
    configs = enumerate_configs(variants=spec.variants, contexts=spec.contexts, caches=spec.caches, split=spec.split)
    cands = [Candidate(config=c, verdict=evaluate(config=c, budget=spec.budget, runtime=spec.runtime))
             for c in configs if c.max_seq_len >= spec.min_ctx]
    if not cands:
        raise StudyError(f"no configuration has a context of at least --min-ctx {spec.min_ctx} tokens")
    return order_for_loads(cands)


def order_for_loads(cands: Sequence[Candidate]) -> list[Candidate]:
    """Variant-major (in the given variant order), then split, cache mode, context descending."""
    vorder: dict[str, int] = {}
    for c in cands:
        vorder.setdefault(c.config.variant.key, len(vorder))
    corder: dict[str, int] = {}
    for c in cands:
        corder.setdefault(c.config.cache, len(corder))
    return sorted(cands, key=lambda c: (vorder[c.config.variant.key], c.config.split.label,
                                        corder[c.config.cache], -c.config.max_seq_len))


def distributions(cands: Sequence[Candidate]) -> dict[str, Any]:
    """Optuna distributions of the three parameters (union over variants)."""
    from optuna.distributions import CategoricalDistribution

    def uniq(xs: Iterator[Any]) -> tuple[Any, ...]:
        return tuple(dict.fromkeys(xs))

    return {
        "variant": CategoricalDistribution(uniq(c.config.variant.key for c in cands)),
        "cache": CategoricalDistribution(uniq(c.config.cache for c in cands)),
        "max_seq_len": CategoricalDistribution(tuple(sorted(uniq(c.config.max_seq_len for c in cands)))),
    }


def config_key_of(params: dict[str, Any], split: Split) -> str:
    return f"{params['variant']}|ctx={int(params['max_seq_len'])}|cache={params['cache']}|split={split.label}"


# ----- records -----------------------------------------------------------------------------------


def predicted_json(verdict: VramVerdict) -> list[dict[str, int]]:
    """Per-device predicted breakdown in bytes (JSON)."""
    return [{"index": d.index, "budget": d.budget, "total": d.total, "weights": d.weights, "cache": d.cache + d.cache_staging,
             "overhead": d.overhead, "scratch": d.scratch + d.rope, "transient": d.transient} for d in verdict.devices]


def base_attrs(cand: Candidate) -> dict[str, Any]:
    c, v = cand.config, cand.config.variant
    return {
        "config_key": cand.key, "variant": v.key, "source": v.source, "format": v.format, "label": v.label,
        "bits": v.bits, "head_bits": v.head_bits, "split": c.split.label, "cache": c.cache,
        "max_seq_len": c.max_seq_len, "predicted": predicted_json(cand.verdict),
        "predicted_fits": cand.verdict.fits,
    }


def predicted_excess_gib(verdict: VramVerdict) -> float:
    return float(verdict.peak_excess) / GIB if verdict.placed else max(float(verdict.peak_excess) / GIB, 1e-3)


def variant_record(v: Variant) -> dict[str, Any]:
    """A JSON record that rebuilds ``v`` (metadata only; no token is ever part of a Location)."""
    return {
        "format": v.format, "label": v.label, "location": asdict(v.location), "bits": v.bits,
        "head_bits": v.head_bits, "config": dict(v.config),
        "tensors": [[t.name, t.dtype, list(t.shape), t.nbytes] for t in v.tensors],
    }


def variant_from_record(rec: dict[str, Any]) -> Variant:
    loc = dict(rec["location"])
    loc["files"] = tuple(loc.get("files") or ())
    return Variant(
        format=rec["format"], label=rec["label"], location=Location(**loc), config=rec["config"],
        tensors=tuple(TensorInfo(name=n, dtype=d, shape=tuple(s), nbytes=int(b)) for n, d, s, b in rec["tensors"]),
        bits=rec.get("bits"), head_bits=rec.get("head_bits"),
    )


def write_variants(*, variants: Sequence[Variant], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({v.key: variant_record(v) for v in variants}))
    os.replace(tmp, path)


def variant_summary(v: Variant) -> dict[str, Any]:
    """Small per-variant facts kept as a study user attribute (what reports need)."""
    return {"source": v.source, "format": v.format, "label": v.label, "bits": v.bits, "head_bits": v.head_bits,
            "download": v.location.download_command(), "weight_bytes": v.total_bytes}


# ----- samplers ----------------------------------------------------------------------------------


def make_sampler(name: str, *, seed: int | None) -> Any:
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(multivariate=True, seed=seed)
    if name == "gp":
        try:
            import scipy  # noqa: F401
            import torch  # noqa: F401
        except ImportError as e:
            raise StudyError(f"--sampler gp needs {e.name} (pip install scipy torch); use --sampler tpe") from None
        return optuna.samplers.GPSampler(seed=seed, deterministic_objective=True)
    if name == "bruteforce":
        return optuna.samplers.BruteForceSampler(seed=seed)
    raise StudyError(f"unknown sampler {name!r} (choose from {', '.join(SAMPLERS)})")


def choose_mode(*, sampler: str, n_todo: int, n_trials: int | None) -> str:
    """``enumerate`` or a sampler name. ``auto`` enumerates when the remaining feasible set fits the budget."""
    if sampler not in SAMPLERS:
        raise StudyError(f"unknown sampler {sampler!r} (choose from {', '.join(SAMPLERS)})")
    if sampler == "bruteforce":
        return "enumerate"
    if sampler == "auto":
        return "enumerate" if n_trials is None or n_todo <= n_trials else "tpe"
    return sampler


# ----- the run -----------------------------------------------------------------------------------


def open_study(*, study_name: str, storage_url: str | None = None, root: Path = DEFAULT_ROOT, storage: Any = None,
               sampler: Any = None, create: bool = True) -> optuna.Study:
    """Create or load the study (three objectives, named metrics).

    ``storage``: an already opened storage (:func:`optimizer.storage.open_storage`); otherwise
    ``storage_url`` / ``root`` are opened here.

    Raises:
        StorageError: the storage cannot be opened, or a journal record is damaged.
        StudyError: ``create=False`` and there is no such study, or it exists with other directions.
    """
    import optuna

    if storage is None:
        storage = open_storage(study=study_name, url=storage_url, root=root)
    try:
        if not create:
            try:
                return optuna.load_study(study_name=study_name, storage=storage, sampler=sampler)
            except KeyError:
                raise StudyError(f"no study named {study_name!r} in this storage") from None
        study = optuna.create_study(study_name=study_name, storage=storage, sampler=sampler, load_if_exists=True,
                                    directions=["minimize", "maximize", "maximize"])
    except json.JSONDecodeError as e:  # a journal line that is not JSON (edited or damaged file)
        raise StorageError(f"the study storage is damaged: a record is not valid JSON ({e}); restore it from a "
                           "backup or start a new --study") from None
    except ValueError as e:  # e.g. an existing study with other directions
        raise StudyError(f"cannot open study {study_name!r}: {first_line(e)}") from None
    if list(study.metric_names or []) != list(METRIC_NAMES):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(METRIC_NAMES))
    return study


def init_study(study: optuna.Study, spec: SearchSpec) -> None:
    """Check (or record) the settings of ``study`` and keep what other processes need to join it.

    Stores the fingerprint and protocols, the full spec (``exl2opt worker --study`` joins without
    ``--model``) and per-variant facts for reports, each only once.

    Raises:
        StudyError: the study was created with other settings.
    """
    from optimizer.distributed import SPEC_ATTR, spec_record

    _check_fingerprint(study, spec)
    if SPEC_ATTR not in study.user_attrs:
        study.set_user_attr(SPEC_ATTR, spec_record(spec))
    if "variants" not in study.user_attrs:
        study.set_user_attr("variants", {v.key: variant_summary(v) for v in spec.variants})


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
) -> SearchResult:
    """Run (or resume) the study ``study_name`` until the space is exhausted, ``n_trials`` GPU
    trials ran, or ``timeout`` seconds passed.

    ``backend_factory(variant)`` returns the backend for a variant's format (only called for
    variants that are measured). ``eval_text()`` is called once, lazily, before the first
    perplexity. ``progress`` is an optional ``rich.progress.Progress``.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from optimizer import distributed

    if storage_url is not None and not storage_url.startswith("sqlite:") and sampler in ("auto", "bruteforce"):
        # a database server shared with other machines: take configurations through the workers'
        # claim protocol (exactly once each, heartbeats, stale retries); see optimizer.distributed
        return distributed.run_worker(spec=spec, study_name=study_name, backend_factory=backend_factory,
                                      eval_text=eval_text, storage_url=storage_url, root=root,
                                      n_trials=n_trials, timeout=timeout)
    run_lock = distributed.run_lock_for(study_name=study_name, storage_url=storage_url, root=root)
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

    st = _State()
    _load_history(study, st)
    _record_infeasible(study, [c for c in cands if not c.verdict.fits], dists, st)

    todo = [c for c in feasible if c.key not in st.results]
    mode = choose_mode(sampler=sampler, n_todo=len(todo), n_trials=n_trials)
    text = functools.cache(eval_text)  # loaded once, before the first perplexity
    task = progress.add_task("trials", total=min(len(todo), n_trials or len(todo))) if progress else None
    gpu_trials = 0
    stop = "exhausted"
    pending: list[Any] = []
    try:
        while True:
            todo = [c for c in todo if c.key not in st.results]
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
                busy = _running_keys(study, spec.split)
                free = [c for c in todo if c.key not in busy]
                if not free:  # everything left is being measured by another worker
                    stop = "others_running"
                    break
                trial = _ask_fixed(study, free[0], dists)
                key = config_key_of(trial.params, spec.split)
                got = by_key.get(key)
                # a leftover WAITING trial (an earlier run stopped between enqueue and ask) or one
                # another process enqueued: settle it without the GPU unless it is new work
                if got is None:
                    tell_outside_space(study, trial, key)
                    continue
                if key in st.results or (key != free[0].key and key in busy):
                    _tell_reused(study, trial, got, st.results.get(key))
                    st.reused += 1
                    continue
                trials, batch = [trial], [got]
            else:
                trials, batch = _ask_batch(study, dists, by_key, st, spec, todo, limit)
            rank = {c.key: i for i, c in enumerate(cands)}
            pending = list(trials)  # asked (RUNNING) but not yet measured: failed if the run stops early
            for trial, cand in sorted(zip(trials, batch, strict=False), key=lambda tc: rank[tc[1].key]):
                def say(phase: str, c: Candidate = cand) -> None:
                    if progress is not None:
                        progress.update(task, description=f"{c.config.variant.label} {c.config.cache} "
                                                          f"ctx {c.config.max_seq_len}: {phase}")

                pending.remove(trial)
                mark_running(trial, cand)
                _measure(study, trial, cand, spec, st, backend_factory, text, say)
                gpu_trials += 1
                if progress is not None:
                    progress.advance(task)
    except BaseException:
        _fail_pending(study, pending)
        raise
    finally:
        close_engines(st)
        if run_lock is not None:
            run_lock.release()
    return SearchResult(
        study_name=study_name, n_feasible=len(feasible), n_infeasible=len(cands) - len(feasible),
        n_measured=st.measured, n_failed=st.failed, n_reused=st.reused, model_loads=st.loads,
        exhausted=stop in ("exhausted", "nothing_fits"), seconds=time.monotonic() - t0, stop_reason=stop,
    )


def _fail_pending(study: optuna.Study, pending: Sequence[Any]) -> None:
    """Fail (as ``interrupted``, so they are retried) the asked trials of a batch the run never reached."""
    from optuna.trial import TrialState

    for trial in pending:
        with contextlib.suppress(Exception):  # the storage may be what failed; sweep_stale cleans up then
            trial.set_user_attr("status", "failed")
            trial.set_user_attr("reason", "interrupted")
            study.tell(trial, state=TrialState.FAIL)


def _running_keys(study: optuna.Study, split: Split) -> set[str]:
    """Configuration keys of trials RUNNING now (in this or another worker)."""
    from optuna.trial import TrialState

    return {config_key_of(t.params, split) for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if {"variant", "cache", "max_seq_len"} <= set(t.params)}


def _check_fingerprint(study: optuna.Study, spec: SearchSpec) -> None:
    fp = spec.fingerprint()
    old = study.user_attrs.get("fingerprint")
    if old is None:
        study.set_user_attr("fingerprint", fp)
        study.set_user_attr("budget_bytes", list(spec.budget.per_device))
        study.set_user_attr("split", spec.split.label)
        study.set_user_attr("eval_protocol", asdict(spec.eval_protocol))
        study.set_user_attr("speed_protocol", asdict(spec.speed_protocol))
    elif old != fp:
        raise StudyError(f"study {study.study_name!r} was created with other settings (changed: "
                         f"{_fingerprint_diff(old, fp)}); rerun with the same options or a new --study name "
                         "(--n-trials, --timeout and --sampler may change)")


_FP_NAMES = {"variants": "models (a moved or renamed model directory counts)", "eval": "eval protocol/data",
             "speed": "speed protocol", "runtime": "runtime options"}


def _fingerprint_diff(old: str, new: str) -> str:
    """The settings that differ between two fingerprints, by their user-facing name
    (``models`` for a moved or renamed model directory too)."""
    try:
        a, b = json.loads(old), json.loads(new)
    except (TypeError, ValueError):
        return "unknown"
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return ", ".join(_FP_NAMES.get(k, k) for k in keys) or "unknown"


def _load_history(study: optuna.Study, st: _State) -> None:
    """Rebuild memos and the set of finished configurations from earlier trials."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
        ua = t.user_attrs
        key = ua.get("config_key")
        if not key:
            continue
        status = ua.get("status")
        if t.state == TrialState.COMPLETE and status == "measured":
            st.results[key] = dict(ua, values=list(t.values), constraint=t.constraints.get(CONSTRAINT, 0.0))
            if ua.get("ppl_key") and ua.get("perplexity") is not None:
                st.ppl[ua["ppl_key"]] = float(ua["perplexity"])
            if ua.get("speed_key") and ua.get("gen_tok_s") is not None:
                st.speed[ua["speed_key"]] = (float(ua["prompt_tok_s"]), float(ua["gen_tok_s"]), int(ua["context_fill"]))
        elif t.state == TrialState.COMPLETE and status == "infeasible":
            st.results.setdefault(key, dict(ua, values=list(t.values), constraint=t.constraints.get(CONSTRAINT, 1.0)))
        elif t.state == TrialState.FAIL and status == "failed" and not is_retryable(ua):
            st.results.setdefault(key, dict(ua, values=None, constraint=None))
        if t.state == TrialState.FAIL and ua.get("ppl_key") and ua.get("perplexity") is not None:
            st.ppl.setdefault(ua["ppl_key"], float(ua["perplexity"]))  # measured before a later phase failed


def is_retryable(ua: dict[str, Any]) -> bool:
    """Whether a failed trial (its user attributes) is measured again by the next run: interrupted,
    stale (its process died) or an unexpected error (``retry``), as opposed to a deterministic engine
    failure such as ``oom``."""
    return ua.get("reason") in ("interrupted", "stale") or ua.get("retry") is True


def _record_infeasible(study: optuna.Study, cands: Sequence[Candidate], dists: dict[str, Any], st: _State) -> None:
    """Add every analytically infeasible configuration once, without touching a GPU."""
    import optuna

    for c in cands:
        if c.key in st.results:
            continue
        ua = dict(base_attrs(c), status="infeasible", reason=c.verdict.reason or "does not fit")
        excess = predicted_excess_gib(c.verdict)
        study.add_trial(optuna.trial.create_trial(
            params=c.params, distributions=dists, values=[PLACEHOLDER_PPL, 0.0, 0.0],
            user_attrs=ua, constraints={CONSTRAINT: excess},
        ))
        st.results[c.key] = dict(ua, values=[PLACEHOLDER_PPL, 0.0, 0.0], constraint=excess)


def _ask_fixed(study: optuna.Study, cand: Candidate, dists: dict[str, Any]) -> optuna.Trial:
    """Ask for ``cand``; a WAITING trial left in the storage is taken first (the caller settles it
    when it is not new work), so no enqueued trial is left behind."""
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        study.enqueue_trial(cand.params)
    trial = study.ask(dists)
    _stamp(trial)  # at once: a RUNNING trial without host/pid could never be swept
    if trial.params != cand.params:  # another worker took our enqueued trial; run what we got
        trial.set_user_attr("note", "enqueued params differed")
    return trial


def _ask_batch(study: optuna.Study, dists: dict[str, Any], by_key: dict[str, Candidate], st: _State,
               spec: SearchSpec, todo: list[Candidate], limit: int) -> tuple[list[Any], list[Candidate]]:
    """Ask up to ASK_BATCH new configurations from the sampler; settle non-GPU asks on the spot.

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
        _stamp(trial)
        if cand is None:
            tell_outside_space(study, trial, key)
        elif key in st.results or key in taken:
            _tell_reused(study, trial, cand, st.results.get(key))
            st.reused += 1
        else:
            trials.append(trial)
            batch.append(cand)
            taken.add(key)
    if not trials:
        cand = todo[0]
        trials, batch = [_ask_fixed(study, cand, dists)], [cand]
    return trials, batch


def _stamp(trial: Any) -> None:
    trial.set_user_attr("host", this_host())
    trial.set_user_attr("pid", os.getpid())


def mark_running(trial: Any, cand: Candidate) -> None:
    """Label a stamped RUNNING trial with its configuration (other workers see it as taken)."""
    for k, v in base_attrs(cand).items():
        trial.set_user_attr(k, v)
    trial.set_user_attr("status", "running")


def tell_outside_space(study: optuna.Study, trial: Any, key: str) -> None:
    """A sampler's ask that names no configuration of the space: told at once with placeholders (no GPU)."""
    trial.set_user_attr("status", "outside_space")
    trial.set_user_attr("config_key", key)
    trial.set_user_attr("reason", "this variant has no such context or cache mode in the search space")
    trial.set_constraint(CONSTRAINT, 1.0)
    study.tell(trial, [PLACEHOLDER_PPL, 0.0, 0.0])


def _tell_reused(study: optuna.Study, trial: Any, cand: Candidate, prev: dict[str, Any] | None) -> None:
    """A duplicate ask: return the stored values (or a placeholder for infeasible / failed ones)."""
    from optuna.trial import TrialState

    for k, v in base_attrs(cand).items():
        trial.set_user_attr(k, v)
    trial.set_user_attr("status", "reused")
    if prev is None:  # proposed twice in one batch: the other copy is being measured
        trial.set_user_attr("reason", "duplicate of a trial in the same batch")
        study.tell(trial, state=TrialState.FAIL)
        return
    if prev.get("values") is None:  # a failed configuration (e.g. oom): not retried
        trial.set_user_attr("reason", prev.get("reason", "failed before"))
        trial.set_constraint(CONSTRAINT, max(predicted_excess_gib(cand.verdict), 1e-3))
        study.tell(trial, [PLACEHOLDER_PPL, 0.0, 0.0])
        return
    trial.set_user_attr("duplicate_of", prev.get("config_key"))
    trial.set_constraint(CONSTRAINT, float(prev.get("constraint") or 0.0))
    study.tell(trial, list(prev["values"]))


def close_engines(st: _State) -> None:
    """Close every engine of a run; closing must not hide the run's real outcome."""
    for eng in st.engines.values():
        with contextlib.suppress(Exception):
            eng.close()


def _engine_for(variant: Variant, st: _State, factory: BackendFactory) -> Engine:
    fmt = variant.format
    if fmt not in st.engines:
        st.engines[fmt] = factory(variant).open()
    if st.active is not None and st.active != fmt:
        st.engines[st.active].unload()
    st.active = fmt
    return st.engines[fmt]


def _measure(study: optuna.Study, trial: Any, cand: Candidate, spec: SearchSpec, st: _State,
             factory: BackendFactory, text: Callable[[], EvalText],
             say: Callable[[str], None] = lambda phase: None) -> None:
    """Load (or reuse), measure what is not memoized, tell. Engine failures fail only this trial.

    ``trial`` is stamped and marked (:func:`mark_running`) by its caller.
    ``say(phase)`` reports the phase (loading, perplexity, speed) to the progress display.
    """
    from optuna.trial import TrialState

    cfg = cand.config
    ppl_key = ""
    try:
        say("loading")
        engine = _engine_for(cfg.variant, st, factory)
        info = engine.prepare(LoadSpec(
            variant=cfg.variant, split=cfg.split, max_seq_len=cfg.max_seq_len, cache=cfg.cache,
            chunk_len=spec.runtime.chunk_len, batch_size=spec.runtime.batch_size, flash_attn=spec.runtime.flash_attn,
            n_gpu_layers=spec.runtime.n_gpu_layers,
        ))
        st.loads += int(info.model_loaded)
        et = text()
        proto = replace(spec.eval_protocol, dataset=et.dataset_id).fitted(cfg.max_seq_len)
        ppl_key = f"{cfg.variant.key}|{cfg.cache}|{proto.key}"
        if ppl_key not in st.ppl:
            say("perplexity")
            if cfg.variant.key not in st.tokens:
                st.tokens[cfg.variant.key] = engine.tokenize(et.text)
            value = float(engine.perplexity(tokens=st.tokens[cfg.variant.key], protocol=proto))
            if not math.isfinite(value) or value <= 0:
                raise EngineError(f"the engine returned an invalid perplexity ({value})")
            st.ppl[ppl_key] = value
        sp = spec.speed_protocol
        fill = max(min(sp.context_fill, cfg.max_seq_len - sp.gen_tokens), 1)
        speed_key = f"{cfg.variant.key}|{cfg.cache}|{cfg.split.label}|{replace(sp, context_fill=fill).key}"
        if speed_key not in st.speed:
            say("speed")
            r = engine.speed(protocol=replace(sp, context_fill=fill))
            if not all(math.isfinite(float(x)) and x >= 0 for x in (r.prompt_tok_s, r.gen_tok_s)):
                raise EngineError(f"the engine returned an invalid speed (prompt {r.prompt_tok_s}, "
                                  f"gen {r.gen_tok_s} tokens/s)")
            st.speed[speed_key] = (float(r.prompt_tok_s), float(r.gen_tok_s), int(r.context_fill))
        mem = engine.memory()
    except EngineError as e:
        reason = "oom" if isinstance(e, EngineOOMError) else (str(e) or type(e).__name__)
        trial.set_user_attr("status", "failed")
        trial.set_user_attr("reason", reason)
        if ppl_key in st.ppl:  # perplexity was measured before e.g. speed failed: keep it for later runs
            trial.set_user_attr("ppl_key", ppl_key)
            trial.set_user_attr("perplexity", st.ppl[ppl_key])
        study.tell(trial, state=TrialState.FAIL)
        st.results[cand.key] = {"config_key": cand.key, "values": None, "reason": reason}
        st.failed += 1
        return
    except Exception as e:  # a bug (e.g. in a backend): fail this trial visibly, retry it next run, stop
        trial.set_user_attr("status", "failed")
        trial.set_user_attr("reason", f"error: {type(e).__name__}: {first_line(e)}")
        trial.set_user_attr("retry", True)
        study.tell(trial, state=TrialState.FAIL)
        raise
    except BaseException:
        trial.set_user_attr("status", "failed")
        trial.set_user_attr("reason", "interrupted")
        study.tell(trial, state=TrialState.FAIL)
        raise
    ppl = st.ppl[ppl_key]
    prompt_s, gen_s, filled = st.speed[speed_key]
    measured = [{"index": m.index, "peak_allocated": m.peak_allocated, "used": m.used} for m in mem]
    excess = _measured_excess(cand.verdict, measured)
    attrs = {"perplexity": ppl, "gen_tok_s": gen_s, "prompt_tok_s": prompt_s, "context_fill": filled,
             "ppl_key": ppl_key, "speed_key": speed_key, "measured": measured,
             "model_loaded": info.model_loaded, "status": "measured", "reason": ""}
    for k, v in attrs.items():
        trial.set_user_attr(k, v)
    values = [ppl, gen_s, float(cfg.max_seq_len)]
    trial.set_constraint(CONSTRAINT, excess)
    study.tell(trial, values)
    st.results[cand.key] = dict(base_attrs(cand), **attrs, values=values, constraint=excess)
    st.measured += 1


def _measured_excess(verdict: VramVerdict, measured: list[dict[str, int]]) -> float:
    """Worst device: measured peak + predicted overhead - budget, in GiB (predicted when not measured)."""
    if not measured:
        return predicted_excess_gib(verdict)
    worst = None
    for m in measured:
        i = m["index"]
        if i >= len(verdict.devices):
            continue
        d = verdict.devices[i]
        ex = (m["peak_allocated"] + d.overhead - d.budget) / GIB
        worst = ex if worst is None else max(worst, ex)
    return float(worst if worst is not None else predicted_excess_gib(verdict))
