"""Trials: how a configuration is labelled in the storage, and the one rule for "which
configurations are done".

Trial user attributes (all JSON): ``config_key, variant, format, label, bits, head_bits, split,
cache, max_seq_len, status`` (running | measured | reused | infeasible | outside_space | failed),
``reason``, ``predicted`` (per-device breakdown, bytes), ``measured`` (per-device peak/used, bytes),
``perplexity, gen_tok_s, prompt_tok_s, context_fill, ppl_key, speed_key, model_loaded, host, pid``,
``gen_tok_s_runs`` (every timed generation run, tokens/s; ``gen_tok_s`` is their median),
``placement_of`` (autosplit: the configuration whose placement the cache was built in, when it was
not this one's own fresh load; ``measured`` is then not a measurement of this configuration's load).

The done rule (:func:`outcome_of`, used by every loop through :func:`scan`): a configuration is
*done* when it has a COMPLETE ``measured`` or ``infeasible`` trial, or a FAIL ``failed`` trial that
is final (an engine failure such as ``oom``). A failure by Ctrl-C / SIGTERM (``interrupted``) or
by an unexpected error (``retry: true``, a bug) is measured again by the next run. A trial whose
process died (``stale``) is retried up to ``max_retry`` times, then given up as failed: it is
probably what kills the process.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from optimizer.storage import this_host
from optimizer.study.candidates import (
    PARAM_NAMES,
    Candidate,
    base_attrs,
    config_key_of,
    predicted_excess_gib,
)
from optimizer.vram import Split

if TYPE_CHECKING:  # pragma: no cover
    import optuna
    from optuna.trial import FrozenTrial

METRIC_NAMES = ("perplexity", "gen_tok_s", "max_seq_len")
CONSTRAINT = "vram_excess_gib"
#: Objective values (perplexity, tokens/s, context) that stand for a configuration without measured ones,
#: dominated by any measured point. Studies from before PRUNED rejections stored them; now only
#: samplers that read COMPLETE trials alone see them (:mod:`optimizer.study.samplers`).
PLACEHOLDER_VALUES = (1.0e4, 0.0, 0.0)
STALE = "stale"
INTERRUPTED = "interrupted"
#: Times a configuration whose process died while measuring it is re-run before it is given up.
DEFAULT_MAX_RETRY = 1


# ----- the done rule ---------------------------------------------------------------------------------


def is_retryable(ua: dict[str, Any]) -> bool:
    """Whether a failed trial (its user attributes) is measured again by the next run: interrupted,
    stale (its process died) or an unexpected error (``retry``), as opposed to a deterministic engine
    failure such as ``oom``."""
    return ua.get("reason") in (INTERRUPTED, STALE) or ua.get("retry") is True


def outcome_of(t: FrozenTrial) -> str:
    """``waiting``, ``running``, ``done``, ``stale`` (its process died), ``retry`` (measured again)
    or ``ignore`` (no configuration, e.g. a reused or outside-the-space ask)."""
    from optuna.trial import TrialState

    ua = t.user_attrs
    if t.state == TrialState.WAITING:
        return "waiting"
    if not ua.get("config_key"):
        return "ignore"
    status = ua.get("status")
    if t.state == TrialState.RUNNING:
        return "running"
    if t.state == TrialState.COMPLETE:  # infeasible: a COMPLETE placeholder in studies made before PRUNED
        return "done" if status in ("measured", "infeasible") else "ignore"
    if t.state == TrialState.PRUNED:
        return "done" if status == "infeasible" else "ignore"
    if t.state == TrialState.FAIL:
        if ua.get("reason") == STALE or status == "running":
            return "stale"
        if status == "failed":
            return "retry" if is_retryable(ua) else "done"
    return "ignore"


@dataclass
class Ledger:
    """What the storage says about every configuration (by config key).

    ``done`` records: ``config_key, status, values`` (None for a failure), ``constraint, reason, number``.
    """

    done: dict[str, dict[str, Any]] = field(default_factory=dict)
    running: dict[str, int] = field(default_factory=dict)  # key -> trial number
    stale: dict[str, int] = field(default_factory=dict)  # key -> times it went stale
    waiting: int = 0
    recorded_infeasible: set[str] = field(default_factory=set)
    retry: dict[str, str] = field(default_factory=dict)  # key -> reason of its last retryable failure

    def failure_reasons(self, keys: set[str] | None = None) -> Counter[str]:
        """How often each reason failed a done configuration (only ``keys`` when given)."""
        return Counter(str(d.get("reason") or "unknown") for k, d in self.done.items()
                       if d.get("status") == "failed" and (keys is None or k in keys))


def scan(study: optuna.Study, *, max_retry: int = DEFAULT_MAX_RETRY) -> Ledger:
    """Read every trial once and classify its configuration by :func:`outcome_of`."""
    led = Ledger()
    for t in study.get_trials(deepcopy=False):
        kind = outcome_of(t)
        if kind == "waiting":
            led.waiting += 1
            continue
        ua = t.user_attrs
        key = str(ua.get("config_key"))
        if kind == "running":
            led.running[key] = t.number
        elif kind == "stale":
            led.stale[key] = led.stale.get(key, 0) + 1
        elif kind == "retry":
            led.retry[key] = str(ua.get("reason") or "unknown")
        elif kind == "done":
            status = ua.get("status")
            if status == "infeasible":
                led.recorded_infeasible.add(key)
            if status == "failed":
                led.done.setdefault(key, {"config_key": key, "values": None, "status": "failed",
                                          "reason": ua.get("reason"), "number": t.number})
            elif key not in led.done or status == "measured":
                led.done[key] = {"config_key": key, "values": list(t.values) if t.values else None, "status": status,
                                 "constraint": (t.constraints or {}).get(CONSTRAINT, 0.0),
                                 "reason": ua.get("reason", ""), "number": t.number}
    for key, n in led.stale.items():
        if n > max_retry and key not in led.done and key not in led.running:
            led.done[key] = {"config_key": key, "values": None, "status": "failed",
                             "reason": f"its process died {n} times while measuring it (given up)"}
    return led


def running_keys(study: optuna.Study, split: Split) -> set[str]:
    """Configuration keys of trials RUNNING now (in this or another process), by their parameters."""
    from optuna.trial import TrialState

    return {config_key_of(t.params, split) for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if set(PARAM_NAMES) <= set(t.params)}


# ----- labelling and telling ---------------------------------------------------------------------------


def stamp(trial: Any) -> None:
    """Record host and pid at once: a RUNNING trial without them could never be swept."""
    trial.set_user_attr("host", this_host())
    trial.set_user_attr("pid", os.getpid())


def mark_running(trial: Any, cand: Candidate) -> None:
    """Label a stamped RUNNING trial with its configuration (other processes see it as taken)."""
    for k, v in base_attrs(cand).items():
        trial.set_user_attr(k, v)
    trial.set_user_attr("status", "running")


def tell_outside_space(study: optuna.Study, trial: Any, key: str) -> None:
    """A sampler's ask that names no configuration of the space: told at once as PRUNED and infeasible (no GPU)."""
    from optuna.trial import TrialState

    trial.set_user_attr("status", "outside_space")
    trial.set_user_attr("config_key", key)
    trial.set_user_attr("reason", "this variant has no such context or cache mode in the search space")
    trial.set_constraint(CONSTRAINT, 1.0)
    study.tell(trial, state=TrialState.PRUNED)


def tell_reused(study: optuna.Study, trial: Any, cand: Candidate, prev: dict[str, Any] | None,
                reason: str | None = None) -> None:
    """A duplicate ask: return the stored values (or a placeholder for infeasible / failed ones). ``reason``: why
    a duplicate without stored values is not measured (default: another copy is being measured)."""
    from optuna.trial import TrialState

    for k, v in base_attrs(cand).items():
        trial.set_user_attr(k, v)
    trial.set_user_attr("status", "reused")
    if prev is None:  # proposed twice in one batch, or running elsewhere: the other copy is measured
        trial.set_user_attr("reason", reason or "duplicate of a trial being measured")
        study.tell(trial, state=TrialState.FAIL)
        return
    if prev.get("values") is None or prev.get("status") == "infeasible":  # failed (e.g. oom) or rejected: no values
        trial.set_user_attr("reason", prev.get("reason") or "failed before")
        trial.set_constraint(CONSTRAINT, max(float(prev.get("constraint") or 0.0), predicted_excess_gib(cand.verdict), 1e-3))
        study.tell(trial, state=TrialState.PRUNED)
        return
    trial.set_user_attr("duplicate_of", prev.get("config_key"))
    trial.set_constraint(CONSTRAINT, float(prev.get("constraint") or 0.0))
    study.tell(trial, list(prev["values"]))


def record_infeasible(study: optuna.Study, cands: Sequence[Candidate], dists: dict[str, Any],
                      done: dict[str, dict[str, Any]]) -> None:
    """Add every analytically infeasible configuration not in ``done`` once, without touching a GPU.

    Each is a PRUNED trial without objective values, with its positive ``vram_excess_gib``
    constraint: TPE files it with the infeasible trials (it checks constraints before states), GP and
    NSGA-II read COMPLETE trials only, and optuna-dashboard leaves PRUNED trials out of its plots,
    so no placeholder number stretches an axis there."""
    import optuna
    from optuna.trial import TrialState

    for c in cands:
        if c.key in done:
            continue
        ua = dict(base_attrs(c), status="infeasible", reason=c.verdict.reason or "does not fit")
        excess = predicted_excess_gib(c.verdict)
        study.add_trial(optuna.trial.create_trial(
            state=TrialState.PRUNED, params=c.params, distributions=dists, user_attrs=ua, constraints={CONSTRAINT: excess},
        ))
        done[c.key] = {"config_key": c.key, "values": None, "status": "infeasible", "constraint": excess, "reason": ua["reason"]}


def fail_interrupted(study: optuna.Study, trials: Sequence[Any]) -> None:
    """Fail still-RUNNING ``trials`` as ``interrupted`` (so they are retried). Never raises: the
    storage may be what failed, and the stale sweep cleans up then."""
    from optuna.trial import TrialState

    for trial in trials:
        with contextlib.suppress(Exception):
            if study._storage.get_trial(trial._trial_id).state != TrialState.RUNNING:
                continue
            trial.set_user_attr("status", "failed")
            trial.set_user_attr("reason", INTERRUPTED)
            study.tell(trial, state=TrialState.FAIL)
