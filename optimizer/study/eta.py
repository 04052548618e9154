"""Progress a person can follow: how long each phase took so far, and an ETA for the rest of a run.

Phases (seconds each): ``load`` (a model load), ``cache`` (only the cache rebuilt), ``perplexity``
(one perplexity measurement) and ``speed`` (one speed measurement, all its timed runs). The work
left is counted from the configurations still to measure, in load order, against the memos: a
model load per distinct model, a perplexity per perplexity key and a speed per speed key not yet
measured. The ETA is unknown until every phase that is still needed has been timed once.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from optimizer.study.candidates import Candidate
from optimizer.study.spec import SearchSpec

PHASES = ("load", "cache", "perplexity", "speed")


@dataclass
class PhaseTimes:
    """Durations of the phases measured so far in this run (seconds)."""

    seconds: dict[str, list[float]] = field(default_factory=dict)

    def add(self, phase: str, seconds: float) -> None:
        self.seconds.setdefault(phase, []).append(float(seconds))

    def typical(self, phase: str) -> float | None:
        """The median duration of ``phase`` (seconds), None when it was never timed."""
        xs = self.seconds.get(phase)
        return statistics.median(xs) if xs else None


def ppl_key_of(cand: Candidate, spec: SearchSpec, dataset_id: str) -> str:
    """The perplexity memo key of a configuration (variant, cache mode, eval protocol fitted to its context)."""
    c = cand.config
    proto = replace(spec.eval_protocol, dataset=dataset_id).fitted(c.max_seq_len)
    return f"{c.variant.key}|{c.cache}|{proto.key}"


def speed_key_of(cand: Candidate, spec: SearchSpec) -> str:
    """The speed memo key of a configuration (variant, cache mode, split, effective context fill)."""
    c, sp = cand.config, spec.speed_protocol
    fill = max(min(sp.context_fill, c.max_seq_len - sp.gen_tokens), 1)
    return f"{c.variant.key}|{c.cache}|{c.split.label}|{replace(sp, context_fill=fill).key}"


def work_left(todo: Sequence[Candidate], *, spec: SearchSpec, ppl_done: set[str], speed_done: set[str],
              dataset_id: str | None, loaded: tuple[str, str] | None) -> dict[str, int]:
    """How many of each phase the configurations ``todo`` still need (counts, by phase)."""
    models = {(c.config.variant.key, c.config.split.label) for c in todo}
    loads = len(models) - (1 if loaded in models else 0)
    ppl = {ppl_key_of(c, spec, dataset_id) for c in todo} - ppl_done if dataset_id is not None else \
        {(c.config.variant.key, c.config.cache, spec.eval_protocol.fitted(c.config.max_seq_len).window) for c in todo}
    speed = {speed_key_of(c, spec) for c in todo} - speed_done
    return {"load": loads, "cache": max(len(todo) - loads, 0), "perplexity": len(ppl), "speed": len(speed)}


def eta_seconds(times: PhaseTimes, work: dict[str, int]) -> float | None:
    """Seconds the ``work`` should take at the typical phase durations so far; None while a needed
    phase (other than a cache rebuild, which is cheap next to a load) has not been timed."""
    total = 0.0
    for phase, n in work.items():
        if n <= 0:
            continue
        t = times.typical(phase)
        if t is None:
            if phase == "cache":
                continue
            return None
        total += n * t
    return total


def describe_eta(seconds: float | None) -> str:
    """``ETA 3 min 05 s`` (or ``ETA after the first measurements`` when unknown)."""
    if seconds is None:
        return "ETA after the first measurements"
    s = int(round(seconds))
    if s >= 3600:
        return f"ETA {s // 3600} h {s % 3600 // 60:02d} min"
    if s >= 60:
        return f"ETA {s // 60} min {s % 60:02d} s"
    return f"ETA {s} s"


def eta_text(left: Sequence[Candidate], *, spec: SearchSpec, times: PhaseTimes, ppl_done: set[str], speed_done: set[str],
             dataset_id: str | None, loaded: tuple[str, str] | None, at_most: bool = False) -> str:
    """`` · N left, ETA ...`` for the configurations ``left`` (empty when nothing is left); ``at_most``
    (the guided search, which skips dominated configurations) says ``N left at most, ETA <= ...``."""
    if not left:
        return ""
    work = work_left(left, spec=spec, ppl_done=ppl_done, speed_done=speed_done, dataset_id=dataset_id, loaded=loaded)
    eta = describe_eta(eta_seconds(times, work))
    if at_most:
        return f" · {len(left)} left at most, {eta.replace('ETA ', 'ETA <= ', 1) if eta[4:5].isdigit() else eta}"
    return f" · {len(left)} left, {eta}"
