"""Measuring one configuration through a backend, with memos that save GPU time.

* perplexity is memoized by (variant, cache mode, eval protocol fitted to the context): not by
  split, nor by context once the context holds the whole eval window;
* speed by (variant, cache mode, split, effective context fill).

Memos are rebuilt from earlier trials (:func:`load_memos`, any process's), so no quantity is
measured twice. For measured trials the constraint ``vram_excess_gib`` is the worst device's
measured peak allocation plus the predicted CUDA-context overhead, minus its budget; a configuration
measured in an autosplit placement made around another one (``placement_of``, see
:mod:`optimizer.study.placement`) did not measure its own load, so its constraint is the prediction.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from optimizer.allocator import AllocatorSetting, for_backend
from optimizer.backends.base import Backend, Engine, EvalProtocol, LoadSpec
from optimizer.backends.progress import on_window
from optimizer.errors import EngineError, EngineOOMError, EngineTransientError
from optimizer.evaldata import EvalText
from optimizer.space import Configuration
from optimizer.storage import first_line
from optimizer.study.candidates import Candidate, base_attrs, measured_excess_gib
from optimizer.study.eta import PhaseTimes, ppl_key_of, speed_key_of
from optimizer.study.spec import SearchSpec
from optimizer.study.trials import CONSTRAINT, INTERRUPTED
from optimizer.variant import Variant

if TYPE_CHECKING:  # pragma: no cover
    import optuna

BackendFactory = Callable[[Variant], Backend]
#: Measures perplexity in place of ``Engine.perplexity`` (the guided search's window-by-window test); a result that
#: is not a number (it has a ``reason``) means "dominated: stop measuring this configuration".
PerplexityFn = Callable[[Engine, Sequence[int], EvalProtocol], Any]


@dataclass
class RunState:
    """Mutable bookkeeping of one run (one process)."""

    done: dict[str, dict[str, Any]] = field(default_factory=dict)  # config key -> done record (see trials.Ledger)
    ppl: dict[str, float] = field(default_factory=dict)
    speed: dict[str, tuple[float, float, int, tuple[float, ...]]] = field(default_factory=dict)  # prompt, gen, fill, gen runs
    tokens: dict[str, Sequence[int]] = field(default_factory=dict)
    times: PhaseTimes = field(default_factory=PhaseTimes)  # seconds per phase, for the ETA
    dataset_id: str | None = None  # of the eval text, once loaded
    loaded: tuple[str, str] | None = None  # model key of the last prepare
    engines: dict[str, Engine] = field(default_factory=dict)
    allocators: dict[str, AllocatorSetting] = field(default_factory=dict)  # format -> PyTorch allocator setting
    active: str | None = None
    loads: int = 0
    measured: int = 0
    failed: int = 0
    reused: int = 0


def load_memos(study: optuna.Study, st: RunState) -> None:
    """Add the perplexity and speed measured by earlier trials (of any process) to the memos.

    A failed trial keeps ``perplexity``/``ppl_key`` when only a later phase (speed) failed, so it
    is reused too.
    """
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
        ua = t.user_attrs
        if ua.get("status") not in ("measured", "failed"):
            continue
        if ua.get("ppl_key") and ua.get("perplexity") is not None:
            st.ppl.setdefault(ua["ppl_key"], float(ua["perplexity"]))
        if t.state == TrialState.COMPLETE and ua.get("speed_key") and ua.get("gen_tok_s") is not None:
            st.speed.setdefault(ua["speed_key"], (float(ua["prompt_tok_s"]), float(ua["gen_tok_s"]), int(ua["context_fill"]),
                                                  tuple(float(x) for x in ua.get("gen_tok_s_runs") or ())))


def close_engines(st: RunState) -> None:
    """Close every engine of a run; closing must not hide the run's real outcome."""
    for eng in st.engines.values():
        with contextlib.suppress(Exception):
            eng.close()


def _engine_for(variant: Variant, st: RunState, factory: BackendFactory) -> Engine:
    fmt = variant.format
    if fmt not in st.engines:
        backend = factory(variant)
        setting = for_backend(backend.name)  # before the engine imports torch
        if setting is not None:
            st.allocators[fmt] = setting
        st.engines[fmt] = backend.open()
    if st.active is not None and st.active != fmt:
        st.engines[st.active].unload()
    st.active = fmt
    return st.engines[fmt]


def measure_speed(engine: Engine, cand: Candidate, *, spec: SearchSpec, st: RunState,
                  say: Callable[[str], None] = lambda phase: None) -> str:
    """Measure the speed of the loaded ``cand`` unless memoized; returns its memo key in ``st.speed``.

    Raises:
        EngineError: the engine failed or returned an invalid speed.
    """
    cfg, sp = cand.config, spec.speed_protocol
    fill = max(min(sp.context_fill, cfg.max_seq_len - sp.gen_tokens), 1)
    speed_key = speed_key_of(cand, spec)
    if speed_key not in st.speed:
        say(f"speed ({sp.repeats} timed runs)")
        t0 = time.perf_counter()
        r = engine.speed(protocol=replace(sp, context_fill=fill))
        if not all(math.isfinite(float(x)) and x >= 0 for x in (r.prompt_tok_s, r.gen_tok_s)):
            raise EngineError(f"the engine returned an invalid speed (prompt {r.prompt_tok_s}, "
                              f"gen {r.gen_tok_s} tokens/s)")
        st.speed[speed_key] = (float(r.prompt_tok_s), float(r.gen_tok_s), int(r.context_fill),
                               tuple(float(x) for x in r.gen_tok_s_runs))
        st.times.add("speed", time.perf_counter() - t0)
    return speed_key


def measure(study: optuna.Study, trial: Any, cand: Candidate, *, spec: SearchSpec, st: RunState,
            factory: BackendFactory, text: Callable[[], EvalText],
            say: Callable[[str], None] = lambda phase: None, perplexity: PerplexityFn | None = None,
            place_around: Configuration | None = None) -> Any:
    """Load (or reuse), measure what is not memoized, tell. Engine failures fail only this trial.

    ``trial`` is stamped and marked (:func:`~optimizer.study.trials.mark_running`) by its caller.
    ``say(phase)`` reports the phase (loading, perplexity window i/n, speed) to the progress display;
    each phase's duration goes to ``st.times``.
    ``perplexity`` replaces ``engine.perplexity``; when it returns a skip (not a number) the trial is told
    PRUNED with ``status: skipped`` and its ``reason`` (not *done*), and the skip is returned.
    ``place_around`` (autosplit): the configuration whose placement to measure ``cand`` in (the VRAM model
    said its cache fits there); when the engine did so, the trial's ``placement_of`` names that configuration
    and its measured memory is kept but not used as a check of ``cand``'s own load. Out of memory there is not
    ``cand``'s verdict: it is measured again with a fresh load of its own, whose outcome the trial records.

    Raises:
        Exception: an unexpected error (a bug), after failing the trial with ``retry: true``.
        KeyboardInterrupt: after failing the trial as ``interrupted``.
    """
    from optuna.trial import TrialState

    cfg = cand.config
    keys = {"ppl": ""}  #: the perplexity memo key once known (kept on a trial that fails after it)
    try:
        say("loading")
        engine = _engine_for(cfg.variant, st, factory)
        if cfg.variant.format in st.allocators:  # what the allocator ran with, also on a failed trial
            for k, v in st.allocators[cfg.variant.format].as_record().items():
                trial.set_user_attr(k, v)
        try:
            got = _measure_in(engine, trial, cand, spec=spec, st=st, text=text, say=say, perplexity=perplexity,
                              place_around=place_around, keys=keys)
        except EngineOOMError:
            if place_around is None or place_around.key == cand.key:
                raise
            # out of memory in a placement made for another cache says nothing of this one's own load: try that
            say("out of memory in the shared placement; loading its own")
            got = _measure_in(engine, trial, cand, spec=spec, st=st, text=text, say=say, perplexity=perplexity,
                              place_around=None, keys=keys)
        if not isinstance(got, tuple):
            study.tell(trial, state=TrialState.PRUNED)  # no placeholder values: dashboards show measured ones only
            return got
        info, speed_key, mem = got
        ppl_key = keys["ppl"]
    except EngineError as e:
        ppl_key = keys["ppl"]
        reason = "oom" if isinstance(e, EngineOOMError) else (str(e) or type(e).__name__)
        trial.set_user_attr("status", "failed")
        trial.set_user_attr("reason", reason)
        if isinstance(e, EngineTransientError):  # e.g. the Hub unreachable: measured again by the next run
            trial.set_user_attr("retry", True)
        if ppl_key in st.ppl:  # perplexity was measured before e.g. speed failed: keep it for later runs
            trial.set_user_attr("ppl_key", ppl_key)
            trial.set_user_attr("perplexity", st.ppl[ppl_key])
        study.tell(trial, state=TrialState.FAIL)
        st.done[cand.key] = {"config_key": cand.key, "values": None, "status": "failed", "reason": reason}
        st.failed += 1
        return None
    except Exception as e:  # a bug (e.g. in a backend): fail this trial visibly, retry it next run, stop
        trial.set_user_attr("status", "failed")
        trial.set_user_attr("reason", f"error: {type(e).__name__}: {first_line(e)}")
        trial.set_user_attr("retry", True)
        study.tell(trial, state=TrialState.FAIL)
        raise
    except BaseException:
        trial.set_user_attr("status", "failed")
        trial.set_user_attr("reason", INTERRUPTED)
        study.tell(trial, state=TrialState.FAIL)
        raise
    ppl = st.ppl[ppl_key]
    prompt_s, gen_s, filled, gen_runs = st.speed[speed_key]
    measured = [m.record() for m in mem]  # peak, used, reserved and the overhead beyond it (bytes)
    placement_of = ""
    if info.placed_around is not None:  # not this configuration's own load: its memory check is the prediction
        ctx, cache = info.placed_around
        placement_of = Configuration(variant=cfg.variant, max_seq_len=ctx, cache=cache, split=cfg.split).key
    excess = measured_excess_gib(cand.verdict, [] if placement_of else measured)
    attrs = {"perplexity": ppl, "gen_tok_s": gen_s, "gen_tok_s_runs": list(gen_runs), "prompt_tok_s": prompt_s, "context_fill": filled,
             "ppl_key": ppl_key, "speed_key": speed_key, "measured": measured,
             "model_loaded": info.model_loaded, "status": "measured", "reason": "",
             **({"placement_of": placement_of} if placement_of else {})}
    for k, v in attrs.items():
        trial.set_user_attr(k, v)
    values = [ppl, gen_s, float(cfg.max_seq_len)]
    trial.set_constraint(CONSTRAINT, excess)
    study.tell(trial, values)
    st.done[cand.key] = dict(base_attrs(cand), **attrs, values=values, constraint=excess)
    st.measured += 1
    return None


def _measure_in(engine: Engine, trial: Any, cand: Candidate, *, spec: SearchSpec, st: RunState,
                text: Callable[[], EvalText], say: Callable[[str], None], perplexity: PerplexityFn | None,
                place_around: Configuration | None, keys: dict[str, str]) -> Any:
    """Prepare ``cand`` (in ``place_around``'s autosplit placement when given) and measure what is not memoized:
    ``(PrepareInfo, speed memo key, memory)``, or the skip ``perplexity`` returned (the trial marked skipped, not told).

    Raises:
        EngineError: the engine failed (EngineOOMError: out of memory).
    """
    cfg = cand.config
    t0 = time.perf_counter()
    load = LoadSpec(
        variant=cfg.variant, split=cfg.split, max_seq_len=cfg.max_seq_len, cache=cfg.cache,
        chunk_len=spec.runtime.chunk_len, batch_size=spec.runtime.batch_size, flash_attn=spec.runtime.flash_attn,
        n_gpu_layers=spec.runtime.n_gpu_layers,
        place_around=(place_around.max_seq_len, place_around.cache) if place_around is not None else None,
    )
    info = engine.prepare(load)
    st.times.add("load" if info.model_loaded else "cache", time.perf_counter() - t0)
    st.loads += int(info.model_loaded)
    st.loaded = load.model_key
    et = text()
    st.dataset_id = et.dataset_id
    proto = replace(spec.eval_protocol, dataset=et.dataset_id).fitted(cfg.max_seq_len)
    ppl_key = keys["ppl"] = ppl_key_of(cand, spec, et.dataset_id)
    if ppl_key not in st.ppl:
        say("perplexity")
        t0 = time.perf_counter()
        if cfg.variant.key not in st.tokens:
            st.tokens[cfg.variant.key] = engine.tokenize(et.text)
        with on_window(lambda done, total: say(f"perplexity window {done}/{total}")):
            got = (engine.perplexity(tokens=st.tokens[cfg.variant.key], protocol=proto) if perplexity is None
                   else perplexity(engine, st.tokens[cfg.variant.key], proto))
        if not isinstance(got, (int, float)):
            trial.set_user_attr("status", "skipped")
            trial.set_user_attr("reason", str(getattr(got, "reason", got)))
            trial.set_constraint(CONSTRAINT, 0.0)
            return got
        value = float(got)
        if not math.isfinite(value) or value <= 0:
            raise EngineError(f"the engine returned an invalid perplexity ({value})")
        st.ppl[ppl_key] = value
        st.times.add("perplexity", time.perf_counter() - t0)
    speed_key = measure_speed(engine, cand, spec=spec, st=st, say=say)
    mem = engine.memory()
    return info, speed_key, mem
