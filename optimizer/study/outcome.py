"""What a run of the study loop did: counts, and why it stopped."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SearchResult:
    """Counts of one run. ``model_loads`` counts engine model loads in this run.

    ``stop_reason``: ``exhausted`` (every feasible configuration has a result), ``nothing_fits``
    (the VRAM model rejects every configuration), ``n_trials``, ``timeout``, ``others_running``
    (everything left is being measured by another process) or ``waiting`` (a worker's wait limit).
    """

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
    n_skipped: int = 0  #: not measured by the guided search (dominated; stored with predictions and reason)
