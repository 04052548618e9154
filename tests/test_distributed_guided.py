"""The guided search with many workers on one study (``exl2opt worker`` without ``--exhaustive``).

Real ``python -m optimizer worker`` processes drive the fake engine (``tests/fake_engine.py``) on one storage (the
journal file, SQLite, PostgreSQL): they find the front an exhaustive run finds, measure fewer configurations,
never measure or skip one twice, store each skip once with predictions and a reason, and a worker killed mid-trial
still gets its trial retried.
"""

from __future__ import annotations

import signal
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from pg import postgres_server, postgres_url  # noqa: F401  (pytest fixtures)
from test_distributed import _calls, _env, _prepared_configs, _wait, _worker_cmd, eval_file, models  # noqa: F401
from test_study import variants_dir  # noqa: F401  (fixture)

from optimizer.schedule import Point, pareto

#: 3 variants x 2 contexts x 3 caches; 4 perplexity windows of 64 tokens, so the paired test has windows to use
SPACE = ["--ctx", "2048,4096", "--cache", "fp16,q4,q8", "--eval-window", "64", "--eval-windows", "4",
         "--speed-fill", "256"]
N_CONFIGS = 18


def _model_args(models: Path) -> list[str]:  # noqa: F811
    return ["-m", str(models), "--vram", "8GB", *SPACE]


def _load(storage: str | None, study: str, root: Path) -> list[Any]:
    import optuna

    from optimizer.storage import open_storage

    return optuna.load_study(study_name=study, storage=open_storage(study=study, url=storage, root=root)).get_trials()


def _front(trials: list[Any]) -> set[str]:
    from optuna.trial import TrialState

    pts = {t.user_attrs["config_key"]: Point(t.values[0], t.values[1], int(t.values[2])) for t in trials
           if t.state == TrialState.COMPLETE and t.user_attrs.get("status") == "measured"}
    return pareto(pts)


def _outcomes(trials: list[Any]) -> Counter[str]:
    """How often each configuration got a final measured or skipped trial (must be once each)."""
    from optuna.trial import TrialState

    return Counter(t.user_attrs["config_key"] for t in trials
                   if (t.state == TrialState.COMPLETE and t.user_attrs.get("status") == "measured")
                   or (t.state == TrialState.PRUNED and t.user_attrs.get("status") == "skipped"))


def _guided_workers(tmp_path: Path, models: Path, eval_file: Path, storage: str | None,  # noqa: F811
                    n: int = 2) -> tuple[list[Any], list[Path]]:
    root = tmp_path / "studies"
    logs = [tmp_path / f"g{i}.log" for i in range(n)]
    procs = [subprocess.Popen(_worker_cmd(study="g", root=root, storage=storage, model_args=_model_args(models),
                                          eval_file=eval_file, exhaustive=False),
                              env=_env(log, 0.05), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for log in logs]
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-2000:]
        assert "skipped (dominated)" in out
    return _load(storage, "g", root), logs


def _check_against_exhaustive(tmp_path: Path, models: Path, eval_file: Path, storage: str | None,  # noqa: F811
                              guided: list[Any], logs: list[Path]) -> None:
    from optuna.trial import TrialState

    # every configuration got exactly one outcome: measured once or skipped once, never both, never twice
    out = _outcomes(guided)
    assert len(out) == N_CONFIGS and set(out.values()) == {1}, out
    measured = {t.user_attrs["config_key"] for t in guided if t.user_attrs.get("status") == "measured"}
    skipped = [t for t in guided if t.state == TrialState.PRUNED and t.user_attrs.get("status") == "skipped"]
    assert measured and skipped and len(measured) + len(skipped) == N_CONFIGS
    for t in skipped:
        ua = t.user_attrs
        assert ua["reason"] and ua["predicted_ppl_low"] <= ua["predicted_ppl"] <= ua["predicted_ppl_high"]
        assert ua["predicted_gen_tok_s_low"] <= ua["predicted_gen_tok_s"] <= ua["predicted_gen_tok_s_high"]
    assert not [t for t in guided if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    # nothing was set up on an engine twice (a skip written by one worker is not measured by another)
    prepared = _prepared_configs(logs)
    assert set(prepared.values()) <= {1}, prepared
    # a measured trial keeps its per-window NLLs for the other workers' paired tests
    windows = [t.user_attrs.get("ppl_window_nll") for t in guided if t.user_attrs.get("status") == "measured"]
    assert any(isinstance(w, list) and len(w) == 4 for w in windows), windows
    # `worker --exhaustive` on the same storage measures every configuration, each once; same front
    root = tmp_path / "studies"
    r = subprocess.run(_worker_cmd(study="x", root=root, storage=storage, model_args=_model_args(models),
                                   eval_file=eval_file), env=_env(tmp_path / "x.log", 0), capture_output=True,
                       text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    exhaustive = _load(storage, "x", root)
    ex_measured = Counter(t.user_attrs["config_key"] for t in exhaustive if t.user_attrs.get("status") == "measured")
    assert len(ex_measured) == N_CONFIGS and set(ex_measured.values()) == {1}
    assert not [t for t in exhaustive if t.user_attrs.get("status") == "skipped"]
    assert _front(guided) == _front(exhaustive)
    assert len(measured) < N_CONFIGS


def test_two_guided_workers_on_one_journal_find_the_exhaustive_front(tmp_path: Path, models: Path,  # noqa: F811
                                                                     eval_file: Path) -> None:  # noqa: F811
    guided, logs = _guided_workers(tmp_path, models, eval_file, None)
    _check_against_exhaustive(tmp_path, models, eval_file, None, guided, logs)


@pytest.mark.slow
def test_three_guided_workers_on_one_sqlite_file_find_the_exhaustive_front(tmp_path: Path, models: Path,  # noqa: F811
                                                                           eval_file: Path) -> None:  # noqa: F811
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    guided, logs = _guided_workers(tmp_path, models, eval_file, url, n=3)
    _check_against_exhaustive(tmp_path, models, eval_file, url, guided, logs)


@pytest.mark.postgres
@pytest.mark.slow
def test_three_guided_workers_on_postgres_find_the_exhaustive_front(tmp_path: Path, models: Path,  # noqa: F811
                                                                    eval_file: Path, postgres_url: str) -> None:  # noqa: F811
    guided, logs = _guided_workers(tmp_path, models, eval_file, postgres_url, n=3)
    _check_against_exhaustive(tmp_path, models, eval_file, postgres_url, guided, logs)


@pytest.mark.slow
def test_a_guided_worker_killed_mid_trial_gets_its_trial_retried(tmp_path: Path, models: Path,  # noqa: F811
                                                                  eval_file: Path) -> None:  # noqa: F811
    from optuna.trial import TrialState

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    root = tmp_path / "studies"
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    cmd = _worker_cmd(study="k", root=root, storage=url, model_args=_model_args(models), eval_file=eval_file,
                      exhaustive=False)
    victim = subprocess.Popen(cmd, env=_env(logs[0], 1.0), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait(lambda: any(w == "ppl" for w, _ in _calls(logs[0])), 60, "the first worker to start measuring")
    killed = [k for w, k in _calls(logs[0]) if w == "cache"][-1]
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    # a second worker fails the trial as stale (no heartbeat) and, guided from the same (empty) results, takes the
    # same configuration first: the retry
    r = subprocess.run(cmd, env=_env(logs[1], 0), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    trials = _load(url, "k", root)
    stale = [t for t in trials if t.state == TrialState.FAIL and t.user_attrs.get("reason") == "stale"]
    assert len(stale) == 1
    key = stale[0].user_attrs["config_key"]
    assert key.startswith(killed.split("|")[0])
    retried = [t for t in trials if t.user_attrs.get("config_key") == key and t.number > stale[0].number
               and t.state == TrialState.COMPLETE and t.user_attrs.get("status") == "measured"]
    assert len(retried) == 1
    out = _outcomes(trials)
    assert len(out) == N_CONFIGS and set(out.values()) == {1}, out
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]


def _paired_worker(tmp_path: Path, spec: Any, n_trials: int | None) -> Any:
    from fake_engine import FakeBackend

    from optimizer.evaldata import EvalText
    from optimizer.study import run_worker

    be = FakeBackend()
    run_worker(spec=spec, study_name="w", backend_factory=lambda v: be, root=tmp_path / "studies",
               eval_text=lambda: EvalText(dataset_id="fake:2", text="hello world " * 200), n_trials=n_trials,
               exhaustive=False, gpus=("RTX 4090",))
    return be


@pytest.mark.parametrize("shared_windows", [True, False])
def test_a_worker_uses_another_workers_windows_in_the_paired_test(tmp_path: Path, variants_dir: Path,  # noqa: F811
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  shared_windows: bool) -> None:
    from test_study_guided import _fp16_q8_spec

    from optimizer.formats import exl2_rules
    from optimizer.study import guided_shared, open_study

    # one context, fp16 and q8 (without exl2's lossless-cache rule, so q8 is decided by the paired test): one worker
    # measures fp16 and stops; a second worker, with nothing of the first but the storage, measures q8's speed, then
    # settles it worse than fp16 on the first windows, using the per-window NLLs stored on fp16's trial
    monkeypatch.delattr(exl2_rules, "LOSSLESS_CACHE")
    spec = _fp16_q8_spec(variants_dir)
    first = _paired_worker(tmp_path, spec, n_trials=1)
    assert [k for w, k in first.engine.calls if w == "ppl"] and all(
        "|fp16" in k for w, k in first.engine.calls if w in ("ppl", "cache"))
    if not shared_windows:  # a study from before the windows were stored: every window is measured, nothing else
        monkeypatch.setattr(guided_shared, "WINDOWS_ATTR", "no_such_attribute")
    second = _paired_worker(tmp_path, spec, n_trials=None)
    q8_windows = [k for w, k in second.engine.calls if w == "ppl"]
    assert q8_windows and all(k.endswith("|q8") for k in q8_windows)
    study = open_study(study_name="w", storage_url=None, root=tmp_path / "studies", create=False)
    by_cache = {t.user_attrs["cache"]: t.user_attrs for t in study.trials if t.user_attrs.get("config_key")}
    assert by_cache["fp16"]["status"] == "measured" and len(by_cache["fp16"]["ppl_window_nll"]) == 8
    if shared_windows:
        assert len(q8_windows) == 3  # min_windows of the paired test, not all 8
        assert by_cache["q8"]["status"] == "skipped" and "shared windows" in by_cache["q8"]["reason"]
        assert by_cache["q8"]["predicted_ppl_low"] <= by_cache["q8"]["predicted_ppl_high"]
    else:
        assert len(q8_windows) == 8 and by_cache["q8"]["status"] == "measured"


def test_a_guided_worker_measures_autosplit_configurations_in_its_shared_placement(tmp_path: Path,  # noqa: F811
                                                                                   variants_dir: Path) -> None:  # noqa: F811
    from dataclasses import replace

    from fake_engine import FakeBackend
    from test_study import _spec, _text

    from optimizer.study import build_space, open_study, run_worker
    from optimizer.study.placement import shared_placements
    from optimizer.vram import Split

    spec = replace(_spec(variants_dir, vram="0.8GiB"), split=Split(mode="auto", n_devices=2))
    feasible = [c for c in build_space(spec) if c.verdict.fits]
    around = shared_placements(feasible, budget=spec.budget, runtime=spec.runtime)
    be = FakeBackend()
    res = run_worker(spec=spec, study_name="a", backend_factory=lambda v: be, root=tmp_path / "studies",
                     eval_text=_text, exhaustive=False, gpus=("RTX 4090",))
    study = open_study(study_name="a", storage_url=None, root=tmp_path / "studies", create=False)
    measured = [t.user_attrs for t in study.trials if t.user_attrs.get("status") == "measured"]
    loads = [k for what, k in be.engine.calls if what == "load"]
    # as `search` does: each variant loaded once, its other configurations built in that placement
    assert len(measured) > len(loads) == len(set(loads)) == len({ua["variant"] for ua in measured})
    assert any(ua.get("placement_of") for ua in measured)
    for ua in measured:
        assert ua.get("placement_of", "") in ("", around[ua["config_key"]].key)
    assert res.exhausted and res.n_skipped == len(feasible) - len(measured) > 0


def _forked_worker(variants: str, root: str, log: str) -> None:
    """One guided worker process on the mixed-fit space of ``tests/test_study.py`` (fork start method)."""
    import os

    from fake_engine import FakeBackend
    from test_study import _spec, _text

    from optimizer.study import run_worker

    os.environ["FAKE_ENGINE_LOG"] = log
    os.environ["FAKE_ENGINE_DELAY"] = "0.02"
    be = FakeBackend()
    run_worker(spec=_spec(Path(variants)), study_name="m", backend_factory=lambda v: be, root=Path(root),
               eval_text=_text, exhaustive=False, gpus=("RTX 4090",))


def test_three_forked_guided_workers_prune_by_each_others_measurements(tmp_path: Path,  # noqa: F811
                                                                       variants_dir: Path) -> None:  # noqa: F811
    import multiprocessing

    from optuna.trial import TrialState
    from test_study import _front as brute_front
    from test_study import _spec
    from test_study_guided import _truth

    from optimizer.study import open_study

    # a space where lossy caches hold more context and some configurations are pruned by a measured point's bound
    truth = _truth(_spec(variants_dir))
    logs = [tmp_path / f"m{i}.log" for i in range(3)]
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_forked_worker, args=(str(variants_dir), str(tmp_path / "studies"), str(log)))
             for log in logs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    trials = open_study(study_name="m", storage_url=None, root=tmp_path / "studies", create=False).trials
    out = _outcomes(trials)
    assert set(out) == set(truth) and set(out.values()) == {1}, out  # measured once or skipped once, never both
    measured = {t.user_attrs["config_key"] for t in trials if t.state == TrialState.COMPLETE
                and t.user_attrs.get("status") == "measured"}
    assert brute_front(truth) <= measured < set(truth)  # the whole true front, fewer measurements
    assert _front(trials) == brute_front(truth)
    assert set(_prepared_configs(logs).values()) == {1}
    reasons = [t.user_attrs["reason"] for t in trials if t.user_attrs.get("status") == "skipped"]
    assert all(reasons) and any(r.startswith("dominated by measured") for r in reasons), reasons
