"""What a run of the study loop did (counts, why it stopped) and what to tell the user at the end."""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass

from optimizer.study.trials import INTERRUPTED, Ledger


@dataclass(frozen=True)
class StudyTally:
    """The study as a whole over its feasible configurations (every process's trials).

    ``failures``: (reason, count) of the failed ones, the most common first.
    """

    measured: int = 0
    failed: int = 0
    left: int = 0
    failures: tuple[tuple[str, int], ...] = ()
    retry_later: tuple[tuple[str, int], ...] = ()  #: (reason, count) of not-done ones that failed for a passing reason


def tally(led: Ledger, feasible_keys: Collection[str]) -> StudyTally:
    """Count measured, failed and not yet done feasible configurations of ``led``."""
    keys = set(feasible_keys)
    measured = sum(1 for k, d in led.done.items() if k in keys and d.get("status") == "measured")
    reasons = led.failure_reasons(keys)
    failed = sum(reasons.values())
    later = Counter(r for k, r in led.retry.items() if k in keys and k not in led.done and r != INTERRUPTED)
    return StudyTally(measured=measured, failed=failed, left=len(keys) - measured - failed,
                      failures=tuple(reasons.most_common()), retry_later=tuple(later.most_common()))


@dataclass(frozen=True)
class SearchResult:
    """Counts of one run. ``model_loads`` counts engine model loads in this run.

    ``stop_reason``: ``exhausted`` (every feasible configuration has a result), ``nothing_fits``
    (the VRAM model rejects every configuration), ``n_trials``, ``timeout``, ``others_running``
    (everything left is being measured by another process) or ``waiting`` (a worker's wait limit).
    ``study``: the whole study at the end of the run.
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
    study: StudyTally = StudyTally()


def ending(res: SearchResult, *, resume: str, report: str) -> list[str]:
    """What happened and what to do next, one line each (commands in backticks, ready to paste).

    ``resume`` runs the study on; ``report`` writes its reports.
    """
    t = res.study
    if res.n_feasible == 0:
        return [f"Nothing fits: the VRAM model rejects all {res.n_infeasible} configurations of this study, so nothing "
                "was measured (trials.csv gives each one's predicted excess and reason). Try a larger --vram, a "
                "smaller --ctx or --min-ctx, quantized --cache modes (q4, q8), or more GPUs (--gpus), under a new "
                "--study name."]
    if t.measured == 0 and t.left == 0 and t.failed:
        reason, count = t.failures[0]
        lines = [f"All {t.failed} configurations that fit the budget failed when measured; the most common reason "
                 f"({count} of {t.failed}): {reason}."]
        if reason == "oom":
            lines.append("They ran out of device memory although the VRAM model predicted they fit: the GPU has less "
                         "free memory than --vram says (another process, a display), or more overhead per GPU; give "
                         "a smaller --vram or a larger --overhead, under a new --study name.")
        else:
            lines.append("This is not a VRAM budget problem: fix the cause above (an engine that is not installed, "
                         "a download that failed, an unreadable model), then measure again under a new --study "
                         "name (engine failures are final within a study).")
        return lines
    lines = []
    if t.failed:
        reason, count = t.failures[0]
        lines.append(f"{t.failed} configuration(s) failed when measured (most common reason, {count}x: {reason}).")
    if t.retry_later:
        n = sum(c for _, c in t.retry_later)
        lines.append(f"{n} configuration(s) failed for a passing reason ({t.retry_later[0][0]}) and are measured "
                     f"again when you resume with `{resume}`")
    if res.stop_reason in ("n_trials", "timeout") and t.left:
        lines.append(f"Stopped by --{res.stop_reason.replace('_', '-')} with {t.left} configuration(s) left; "
                     f"continue with `{resume}`")
    elif res.stop_reason in ("others_running", "waiting") and t.left:
        lines.append(f"The remaining {t.left} configuration(s) are being measured by other processes; once they "
                     f"finish, write the reports with `{report}`")
    return lines


def interrupted(*, resume: str) -> str:
    """The one line for a run stopped by Ctrl-C or SIGTERM."""
    return ("every finished measurement is kept, and the configuration that was being measured is measured again "
            f"when you resume with `{resume}`")
