"""The prediction-guided search (the default of ``exl2opt search`` and ``exl2opt worker``; ``--exhaustive`` measures
everything; workers share it through the storage, :mod:`optimizer.study.guided_shared`).

A :class:`Guide` wraps :class:`optimizer.schedule.Schedule` for the study loop: it predicts every feasible
configuration (:class:`optimizer.predict.refit.SpacePredictor`), tells the loop which one to measure next, refits
after each measurement and prunes configurations whose optimistic bound a measured point dominates. Perplexity is
measured window by window (:meth:`Guide.perplexity`): windows are the same text for every configuration, so against
the measured configuration that beats the candidate in tok/s and context with the lowest perplexity, a paired test
settles "worse" after a few windows; the candidate is then skipped without its remaining windows and its speed test.
Skipped configurations are stored as trials with ``status: skipped``, their predicted values and the reason; they are
not *done* (:mod:`optimizer.study.trials`), so an ``--exhaustive`` run of the same study measures them.

Under autosplit a variant is loaded once, placed around its roomiest configuration, and the configurations whose
cache the VRAM model fits in that placement are measured there (:mod:`optimizer.study.placement`); they share one
load in the schedule, as a single GPU's or a manual split's configurations do. ``--exhaustive`` loads each afresh.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from optimizer.backends.base import Engine, EvalProtocol
from optimizer.backends.progress import on_window, window_done
from optimizer.formats import rules_for
from optimizer.predict.refit import Observation, SpaceEntry, SpacePredictor
from optimizer.schedule import Item, Measured, Schedule, Skipped, paired_decision
from optimizer.space import Configuration
from optimizer.study.candidates import Candidate, base_attrs
from optimizer.study.measure import RunState, measure_speed
from optimizer.study.placement import shared_placements
from optimizer.study.spec import SearchSpec
from optimizer.study.trials import CONSTRAINT

if TYPE_CHECKING:  # pragma: no cover
    import optuna

SKIPPED = "skipped"
#: Trial user attribute: the measured configuration's per-window negative log-likelihoods (nats, in window order),
#: so another worker (or a later run) can use it as the reference of the paired perplexity test.
WINDOWS_ATTR = "ppl_window_nll"


@dataclass(frozen=True)
class Skip:
    """Returned by :meth:`Guide.perplexity` instead of a value: the configuration is dominated."""

    reason: str


def _group(c: Candidate, spec: SearchSpec, cache: str | None = None) -> str:
    """Configurations that share perplexity and speed: same variant, cache, split, speed fill and eval window
    (``cache``: the group of the same configuration with that cache instead)."""
    cfg = c.config
    sp = spec.speed_protocol
    fill = max(min(sp.context_fill, cfg.max_seq_len - sp.gen_tokens), 1)
    win = spec.eval_protocol.fitted(cfg.max_seq_len).window
    return f"{cfg.variant.key}|{cache or cfg.cache}|{cfg.split.label}|fill={fill}|win={win}"


def _lossless_group(c: Candidate, spec: SearchSpec) -> str | None:
    """The group of ``c`` with its format's lossless cache when ``c``'s cache is a lossy copy of it (see
    ``LOSSLESS_CACHE`` in :mod:`optimizer.formats`), else None."""
    lossless = getattr(rules_for(c.config.variant.format), "LOSSLESS_CACHE", None)
    return _group(c, spec, lossless) if lossless and c.config.cache != lossless else None


@dataclass
class Guide:
    """The guided schedule of one run over the feasible candidates ``cands``."""

    cands: Sequence[Candidate]
    spec: SearchSpec
    gpus: Sequence[str] = ()
    margin: float = 0.002
    windows: dict[str, tuple[float, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        sp = self.spec.speed_protocol
        self.by_key = {c.key: c for c in self.cands}
        self.predictor = SpacePredictor([SpaceEntry(c.key, c.config, c.verdict) for c in self.cands], gpus=self.gpus,
                                        fill=sp.context_fill)
        first = self.predictor.refit()
        #: autosplit: the configuration whose placement each one is measured in (absent: a fresh load of its own)
        self.placement = shared_placements(self.cands, budget=self.spec.budget, runtime=self.spec.runtime)
        items = [Item(key=c.key, load=self._load_key(c), group=_group(c, self.spec),
                      ctx=c.config.max_seq_len, ppl=first[c.key][0], tok_s=first[c.key][1],
                      lossless=_lossless_group(c, self.spec)) for c in self.cands]
        self.schedule = Schedule(items, predictor=self._refit, margin=self.margin)
        self.reported: set[str] = set()

    def _load_key(self, c: Candidate) -> str:
        """Configurations with the same key share a model load: a variant with its split, and under autosplit
        the placement (a configuration that cannot share one is a load of its own)."""
        cfg = c.config
        if cfg.split.mode != "auto" or not getattr(rules_for(cfg.variant.format), "SPLIT_PLACED_AROUND_CACHE", True):
            return f"{cfg.variant.key}|{cfg.split.label}"
        around = self.placement.get(c.key)
        return f"{cfg.variant.key}|{cfg.split.label}|around={around.max_seq_len}:{around.cache}" if around else c.key

    def place_around(self, cand: Candidate) -> Configuration | None:
        """The configuration whose autosplit placement ``cand`` is measured in (None: its own fresh load)."""
        return self.placement.get(cand.key)

    def _refit(self, ms: Sequence[Measured]) -> Any:
        return self.predictor.refit([Observation(m.key, m.ppl, m.tok_s) for m in ms])

    def claim(self, busy: Collection[str]) -> Candidate | None:
        """The next configuration to measure, without ``busy`` (keys measured elsewhere now; they stay pending, so
        a retry after a failure there is still scheduled). A lossy cache whose lossless sibling is busy waits for
        its result (None). Used by the workers (:mod:`optimizer.study.guided_shared`)."""
        hold = set(busy)
        pending = self.schedule.pending()
        keys = {it.key for it in pending}
        for it in pending:
            sib = self.schedule.lossless_sibling(it)
            if sib is not None and sib.key in busy and sib.key in keys:
                hold.add(it.key)
        nxt = self.schedule.next(exclude=hold)
        return self.by_key[nxt.key] if nxt is not None else None

    def adopt(self, key: str, reason: str) -> None:
        """Another worker stored ``key`` as skipped: skip it here too (already reported, never written again)."""
        if key in {it.key for it in self.schedule.pending()}:
            self.schedule.skip(self.schedule.item(key), reason)
        self.reported.add(key)

    def next(self, free: Sequence[Candidate]) -> Candidate | None:
        """The next configuration to measure among ``free`` (None: nothing left worth measuring)."""
        allowed = {c.key for c in free}
        for it in self.schedule.pending():
            if it.key not in allowed:
                self.schedule.drop(it.key)
        nxt = self.schedule.next()
        return self.by_key[nxt.key] if nxt is not None else None

    def annotate(self, trial: Any, cand: Candidate) -> None:
        """Store the current predictions on the trial about to be measured (reports show them next to the result)."""
        it = self.schedule.item(cand.key)
        for k, v in _predicted_attrs(it).items():
            trial.set_user_attr(k, v)

    def observe(self, cand: Candidate, record: dict[str, Any] | None, skip: Any = None, *, own: bool = True) -> None:
        """After the loop measured, failed or (paired test) skipped ``cand``: refit and prune. ``own`` False: another
        worker's result (its load is not the one this process holds)."""
        if skip is not None:  # the measure step told the trial as skipped already
            self.schedule.skip(self.schedule.item(cand.key), str(getattr(skip, "reason", skip)))
            self.reported.add(cand.key)
        else:
            self.observe_all([(cand, record)], own=own)

    def observe_all(self, results: Sequence[tuple[Candidate, dict[str, Any] | None]], *, own: bool = True) -> None:
        """Results that arrive together (e.g. other workers'): measured ones refit and prune once, on all of them;
        the others (failed) leave the schedule."""
        ms = []
        for cand, record in results:
            if record and record.get("status") == "measured" and record.get("values"):
                ppl, tok_s = float(record["values"][0]), float(record["values"][1])
                ms.append(Measured(cand.key, ppl, tok_s, self.windows.get(cand.key, ())))
            else:
                self.schedule.drop(cand.key)
        if ms:
            self.schedule.record(*ms, own=own)

    def new_skips(self, hold: Collection[str] = ()) -> list[Skipped]:
        """Skipped configurations not yet written to the study (``hold``: keys not to report yet, e.g. being
        measured by another worker now)."""
        out = [s for s in self.schedule.skipped if s.item.key not in self.reported and s.item.key not in hold]
        self.reported.update(s.item.key for s in out)
        return out

    def perplexity(self, cand: Candidate, st: RunState, trial: Any = None) -> Any:
        """A perplexity function for the measure step: the (cheap) speed test first, then perplexity window by
        window, stopping early when a measured configuration at least as fast, with as much context, is settled
        better on the shared windows. ``trial``: where the per-window values are kept (:data:`WINDOWS_ATTR`)."""

        def run(engine: Engine, tokens: Sequence[int], proto: EvalProtocol) -> float | Skip:
            tok_s = st.speed[measure_speed(engine, cand, spec=self.spec, st=st)][1]
            ref_key = self.schedule.threshold_reference(self.schedule.item(cand.key), tok_s)
            ref = self.windows.get(ref_key, ()) if ref_key else ()
            one = replace(proto, n_windows=1)
            w = proto.window
            nll: list[float] = []
            for i in range(proto.n_windows):
                piece = tokens[i * w:(i + 1) * w]
                if len(piece) < w:
                    break
                with on_window(lambda done, total: None):  # the engine sees one window; report ours
                    nll.append(math.log(float(engine.perplexity(tokens=piece, protocol=one))))
                window_done(i + 1, proto.n_windows)
                if ref:
                    d = paired_decision(nll, ref)
                    if d.settled and d.worse:
                        self.windows[cand.key] = tuple(nll)
                        p = self.schedule.points[str(ref_key)]
                        return Skip(f"dominated: perplexity above measured {ref_key}'s on {d.n} shared windows (paired "
                                    f"mean log-ppl +{d.mean_diff:.4f} +- {d.stderr:.4f}), which is as fast or faster "
                                    f"({p.tok_s:.4g} against a measured {tok_s:.4g} tok/s) with as much context")
            if not nll:
                return float(engine.perplexity(tokens=tokens, protocol=proto))
            self.windows[cand.key] = tuple(nll)
            if trial is not None:
                trial.set_user_attr(WINDOWS_ATTR, list(nll))
            return math.exp(sum(nll) / len(nll))

        return run


def _predicted_attrs(it: Item) -> dict[str, float]:
    return {"predicted_ppl": it.ppl.value, "predicted_ppl_low": it.ppl.low, "predicted_ppl_high": it.ppl.high,
            "predicted_gen_tok_s": it.tok_s.value, "predicted_gen_tok_s_low": it.tok_s.low,
            "predicted_gen_tok_s_high": it.tok_s.high}


def record_skipped(study: optuna.Study, skipped: Sequence[Skipped], by_key: dict[str, Candidate],
                   dists: dict[str, Any]) -> None:
    """Store each skipped configuration as a PRUNED trial (no placeholder values for dashboards to plot):
    ``status: skipped``, its predictions and the reason."""
    import optuna
    from optuna.trial import TrialState

    for s in skipped:
        c = by_key.get(s.item.key)
        if c is None:
            continue
        ua = dict(base_attrs(c), status=SKIPPED, reason=s.reason, **_predicted_attrs(s.item))
        study.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED, params=c.params, distributions=dists,
                                                  user_attrs=ua, constraints={CONSTRAINT: 0.0}))
