"""The Optuna study: measure the feasible configurations, once each, with as few model loads as possible.

Modules, by responsibility (each imports only the ones above it):

* :mod:`~optimizer.study.spec`: :class:`SearchSpec`, its fingerprint and its one stored record;
* :mod:`~optimizer.study.candidates`: the space of a spec, predicted, in measurement order;
* :mod:`~optimizer.study.trials`: trial labels and the one rule for "which configurations are done";
* :mod:`~optimizer.study.samplers`, :mod:`~optimizer.study.opening`, :mod:`~optimizer.study.outcome`,
  :mod:`~optimizer.study.commands` (the commands printed for the user to run);
* :mod:`~optimizer.study.measure`: measuring one configuration through a backend, with memos;
* :mod:`~optimizer.study.locks`, :mod:`~optimizer.study.liveness`: claims, run locks, heartbeats;
* :mod:`~optimizer.study.worker_loop` (``exl2opt worker``) and :mod:`~optimizer.study.local_loop`
  (``exl2opt search``).
"""

from optimizer.study.candidates import Candidate, build_space, config_key_of, distributions
from optimizer.study.local_loop import run
from optimizer.study.measure import BackendFactory
from optimizer.study.opening import init_study, load_spec, open_study, stored_spec
from optimizer.study.outcome import SearchResult, StudyTally, ending, interrupted
from optimizer.study.samplers import SAMPLERS, choose_mode
from optimizer.study.spec import SearchSpec, spec_from_record, spec_record
from optimizer.study.trials import CONSTRAINT, METRIC_NAMES, Ledger, scan
from optimizer.study.worker_loop import WorkerOptions, run_worker

__all__ = [
    "CONSTRAINT", "METRIC_NAMES", "SAMPLERS", "BackendFactory", "Candidate", "Ledger", "SearchResult",
    "SearchSpec", "WorkerOptions", "build_space", "choose_mode", "config_key_of", "distributions",
    "StudyTally", "ending", "init_study", "interrupted", "load_spec", "open_study", "run", "run_worker", "scan",
    "spec_from_record", "spec_record", "stored_spec",
]
