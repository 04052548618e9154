"""Which sampler proposes configurations.

``bruteforce`` enumerates every feasible configuration in load order; ``auto`` does that when the
feasible set fits ``n_trials`` and otherwise uses ``tpe`` (``TPESampler(multivariate=True)``, asked
in batches of :data:`ASK_BATCH` that are sorted to share loads); ``gp`` is ``GPSampler``.

Rejected (and skipped) configurations are PRUNED trials, so optuna-dashboard shows only measured
values. TPE files rejected ones with the infeasible trials, as before, because it checks constraints
before states.
GPSampler reads COMPLETE trials only and would keep proposing rejected configurations
(optuna-notes §2.4: 383 of 400 asks), so ``gp`` sees them through :class:`RejectedAsPlaceholders`:
as COMPLETE trials with the dominated placeholder values it learnt from before.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from optimizer.errors import StudyError
from optimizer.study.trials import PLACEHOLDER_VALUES

SAMPLERS = ("auto", "tpe", "bruteforce", "gp")
#: Configurations asked from a sampler at once (then measured in load order).
ASK_BATCH = 4
#: Statuses of PRUNED trials (configurations without measured values) that GP sees as placeholders.
REJECTED = ("infeasible", "outside_space", "reused", "skipped")


class RejectedAsPlaceholders:
    """A read-only view of a study in which PRUNED rejected trials look COMPLETE with
    :data:`PLACEHOLDER_VALUES` (everything else is the study itself)."""

    def __init__(self, study: Any) -> None:
        self._study = study

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def _get_trials(self, deepcopy: bool = True, states: Iterable[Any] | None = None, use_cache: bool = False) -> list[Any]:
        from optuna.trial import TrialState

        want: tuple[Any, ...] | None = None if states is None else tuple(states)
        ask = want if want is None or TrialState.COMPLETE not in want else (*want, TrialState.PRUNED)
        out = []
        for t in self._study._get_trials(deepcopy=deepcopy, states=ask, use_cache=use_cache):
            if t.state == TrialState.PRUNED and t.user_attrs.get("status") in REJECTED and (want is None or TrialState.COMPLETE in want):
                t = copy.copy(t)
                t.state = TrialState.COMPLETE
                t.values = list(PLACEHOLDER_VALUES)
            elif want is not None and t.state not in want:
                continue
            out.append(t)
        return out


def _view(study: Any) -> Any:
    return RejectedAsPlaceholders(study)


def _gp_sampler(*, seed: int | None) -> Any:
    import optuna

    class RejectionAwareGPSampler(optuna.samplers.GPSampler):  # type: ignore[misc]
        """GPSampler that sees rejected configurations as dominated COMPLETE trials."""

        def infer_relative_search_space(self, study: Any, trial: Any) -> Any:
            return super().infer_relative_search_space(_view(study), trial)

        def sample_relative(self, study: Any, trial: Any, search_space: Any) -> Any:
            return super().sample_relative(_view(study), trial, search_space)

        def sample_independent(self, study: Any, trial: Any, param_name: str, param_distribution: Any) -> Any:
            return super().sample_independent(_view(study), trial, param_name, param_distribution)

    return RejectionAwareGPSampler(seed=seed, deterministic_objective=True)


def make_sampler(name: str, *, seed: int | None) -> Any:
    """The Optuna sampler named ``name`` (tpe | gp | bruteforce).

    Raises:
        StudyError: an unknown name, or ``gp`` without scipy / torch.
    """
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(multivariate=True, seed=seed)
    if name == "gp":
        try:
            import scipy  # noqa: F401
            import torch  # noqa: F401
        except ImportError as e:
            raise StudyError(f"--sampler gp needs {e.name} (pip install scipy torch); use --sampler tpe") from None
        return _gp_sampler(seed=seed)
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
