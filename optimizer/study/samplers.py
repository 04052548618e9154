"""Which sampler proposes configurations.

``bruteforce`` enumerates every feasible configuration in load order; ``auto`` does that when the
feasible set fits ``n_trials`` and otherwise uses ``tpe`` (``TPESampler(multivariate=True)``, asked
in batches of :data:`ASK_BATCH` that are sorted to share loads); ``gp`` is ``GPSampler``.
"""

from __future__ import annotations

from typing import Any

from optimizer.errors import StudyError

SAMPLERS = ("auto", "tpe", "bruteforce", "gp")
#: Configurations asked from a sampler at once (then measured in load order).
ASK_BATCH = 4


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
