"""The guided search with many workers on one study (``exl2opt worker`` without ``--exhaustive``).

The storage is the only state the workers share. Each worker keeps its own :class:`~optimizer.study.guided.Guide`
(the same predictions, placements and rules as ``exl2opt search``) and, under the study's claim lock, brings it up to
date with the storage before it claims (:meth:`SharedGuide.pick`):

* every result in the storage (any worker's) is observed once, all new ones together: measurements refit the predictions
  and prune, failures take the configuration out; a measured trial's per-window NLLs
  (:data:`~optimizer.study.guided.WINDOWS_ATTR`) become the reference of the paired perplexity test here too;
* every configuration another worker stored as skipped is skipped here and never written again;
* configurations this worker now finds dominated are written as skipped trials, still under the lock, so no two
  workers write the same skip; one being measured elsewhere right now is held back until that trial ends (when it
  ends measured or skipped there, nothing is written; when it fails for a passing reason, the skip is written);
* the next configuration is the guide's pick among those not done and not RUNNING elsewhere; the worker's own load
  comes first (:meth:`optimizer.schedule.Schedule.next`), other workers' results do not change which load it holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from optimizer.study.candidates import Candidate
from optimizer.study.guided import SKIPPED, WINDOWS_ATTR, Guide, record_skipped
from optimizer.study.trials import Ledger

if TYPE_CHECKING:  # pragma: no cover
    import optuna


def stored_view(study: optuna.Study) -> tuple[dict[str, str], dict[str, tuple[float, ...]]]:
    """What the storage holds for the guided search: skipped configurations (key -> reason) and the per-window
    NLLs of measured ones (key -> values, nats)."""
    from optuna.trial import TrialState

    skips: dict[str, str] = {}
    windows: dict[str, tuple[float, ...]] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED, TrialState.COMPLETE)):
        ua = t.user_attrs
        key = ua.get("config_key")
        if not key:
            continue
        if t.state == TrialState.PRUNED and ua.get("status") == SKIPPED:
            skips.setdefault(str(key), str(ua.get("reason") or SKIPPED))
        elif ua.get("status") == "measured" and isinstance(ua.get(WINDOWS_ATTR), list):
            windows[str(key)] = tuple(float(x) for x in ua[WINDOWS_ATTR])
    return skips, windows


@dataclass
class SharedGuide:
    """One worker's view of the guided search over a study shared with other workers."""

    guide: Guide
    by_key: dict[str, Candidate]
    dists: dict[str, Any]
    #: keys whose result (measured, failed, skipped) this worker's guide has taken in
    seen: set[str] = field(default_factory=set)
    #: keys stored as skipped in the study (as of the last :meth:`pick`, with what it wrote)
    skipped: set[str] = field(default_factory=set)
    written: int = 0  #: skipped trials this worker wrote
    mine: str | None = None  #: the configuration this worker measured last (its engine holds that load)

    def pick(self, study: optuna.Study, led: Ledger, *, tried: Mapping[str, Any]) -> Candidate | None:
        """Under the claim lock: take in the storage (``led`` = :func:`~optimizer.study.trials.scan` of it, read
        under the same lock), write the new skips, and return the configuration to claim (None: nothing this
        worker may take now). ``tried``: this worker's own results, e.g. a passing failure not to retry here."""
        skips, windows = stored_view(study)
        fresh = []
        for key, rec in led.done.items():
            cand = self.guide.by_key.get(key)
            if cand is None or key in self.seen:
                continue
            self.seen.add(key)
            if key in windows:
                self.guide.windows.setdefault(key, windows[key])
            fresh.append((cand, rec))
        self.guide.observe_all(fresh, own=False)  # one refit on all of them, then the prune
        for key, rec in tried.items():  # failed here for a passing reason: not retried by this worker
            if key not in led.done and (rec or {}).get("status") != "measured":
                self.guide.schedule.drop(key)
        held = {it.key: it.load for it in self.guide.schedule.items}.get(self.mine or "")
        if held is not None:  # the load this worker's engine holds comes first
            self.guide.schedule.loaded = held
        for key, reason in skips.items():
            if key not in self.seen:
                self.seen.add(key)
                self.guide.adopt(key, reason)
        busy = set(led.running)
        new = [s for s in self.guide.new_skips(hold=busy) if s.item.key not in led.done and s.item.key not in skips]
        record_skipped(study, new, self.by_key, self.dists)
        self.written += len(new)
        self.skipped = set(skips) | {s.item.key for s in new}
        return self.guide.claim(busy | set(tried) | set(led.done))

    def measured_here(self, cand: Candidate) -> None:
        """After this worker measured ``cand`` (its load is now the one held). Its result, like every other, is taken
        in by the next :meth:`pick`, under the lock with all results stored by then: pruning on this worker's view
        alone, outside the lock, would rest on fewer measurements than the study has."""
        self.mine = cand.key
