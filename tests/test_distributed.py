"""Distributed workers: exactly-once claims, SIGKILL mid-trial, Ctrl-C, OOM, unreachable storage.

Workers are real ``python -m optimizer worker`` processes driving the fake engine
(``tests/fake_engine.py``, slowed by ``FAKE_ENGINE_DELAY`` so a kill lands mid-trial). Every
process writes its engine calls to its own ``FAKE_ENGINE_LOG`` file, so the test can count what was
measured where. The PostgreSQL tests run against a private server started by ``tests/pg.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from exl2_fixtures import TINY_LLAMA, make_exl2_dir
from pg import postgres_server, postgres_url  # noqa: F401  (pytest fixtures)
from printed import argv_of, printed_commands

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
BITS = (3.0, 4.0, 5.0)
CACHES = "fp16,q4,q8"


@pytest.fixture()
def models(tmp_path: Path) -> Path:
    d = tmp_path / "models"
    for b in BITS:
        make_exl2_dir(d, f"tiny-{b}bpw", dict(TINY_LLAMA), bits=b)
    return d


@pytest.fixture()
def eval_file(tmp_path: Path) -> Path:
    f = tmp_path / "eval.txt"
    f.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    return f


def _env(log: Path, delay: float, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["FAKE_ENGINE_LOG"] = str(log)
    env["FAKE_ENGINE_DELAY"] = str(delay)
    env.pop("FAKE_ENGINE_OOM", None)
    env.update(extra)
    return env


def _worker_cmd(*, study: str, root: Path, storage: str | None, model_args: list[str], eval_file: Path,
                heartbeat: int = 1, grace: int = 3, exhaustive: bool = True) -> list[str]:
    """A worker command; ``exhaustive`` (these tests count measurements): measure every configuration."""
    cmd = [sys.executable, "-m", "optimizer", "worker", "--study", study, "--root", str(root),
           "--eval-data", str(eval_file), "--backend-factory", "fake_engine:fake_backend_factory",
           "--heartbeat", str(heartbeat), "--grace", str(grace), "--poll", "0.3"] + (["--exhaustive"] * exhaustive)
    if storage:
        cmd += ["--storage", storage]
    return cmd + model_args


def _model_args(models: Path) -> list[str]:
    return ["-m", str(models), "--vram", "8GB", "--ctx", "2048", "--cache", CACHES]


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _calls(log: Path) -> list[tuple[str, str]]:
    if not log.exists():
        return []
    return [tuple(json.loads(line)) for line in log.read_text().splitlines() if line.strip()]  # type: ignore[misc]


def _wait(pred: Any, timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _trials(storage: str, study: str) -> list[Any]:
    import optuna

    return optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)


def _prepared_configs(logs: list[Path]) -> Counter[str]:
    """How often each configuration (variant|cache|ctx) was set up for measurement, over all workers."""
    return Counter(key for log in logs for what, key in _calls(log) if what == "cache")


@pytest.mark.postgres
@pytest.mark.slow
def test_three_workers_one_sigkilled_mid_trial(tmp_path: Path, models: Path, eval_file: Path,
                                               postgres_url: str) -> None:  # noqa: F811
    from optuna.trial import TrialState

    study = "dist"
    logs = [tmp_path / f"w{i}.log" for i in range(3)]
    procs: list[subprocess.Popen[str]] = []
    root = tmp_path / "studies"
    # worker 0 creates the study (with the model options); the others read the settings from it
    procs.append(subprocess.Popen(
        _worker_cmd(study=study, root=root, storage=postgres_url, model_args=_model_args(models), eval_file=eval_file),
        env=_env(logs[0], 1.5, CUDA_VISIBLE_DEVICES="0"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    _wait(lambda: any(w == "ppl" for w, _ in _calls(logs[0])), 60, "worker 0 to start measuring")
    for i in (1, 2):
        procs.append(subprocess.Popen(
            _worker_cmd(study=study, root=tmp_path / f"studies{i}", storage=postgres_url, model_args=[],
                        eval_file=eval_file),
            env=_env(logs[i], 1.5, CUDA_VISIBLE_DEVICES=str(i)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True))
    # kill a joining worker while it is inside a measurement (after 'ppl' started, before 'speed')
    def mid_trial(i: int) -> bool:
        c = _calls(logs[i])
        return sum(w == "ppl" for w, _ in c) > sum(w == "speed" for w, _ in c)

    victim: list[int] = []
    _wait(lambda: victim.extend(i for i in (1, 2) if mid_trial(i)) or bool(victim), 90, "a joining worker mid-trial")
    v = victim[0]
    survivor = 3 - v
    killed_key = [k for w, k in _calls(logs[v]) if w == "cache"][-1]
    procs[v].send_signal(signal.SIGKILL)
    procs[v].wait(10)
    outs = {}
    for i in (0, survivor):
        out, err = procs[i].communicate(timeout=120)
        outs[i] = (out, err)
        assert procs[i].returncode == 0, err[-2000:]
    trials = _trials(postgres_url, study)
    by_state = Counter(t.state for t in trials)
    assert by_state[TrialState.RUNNING] == 0 and by_state[TrialState.WAITING] == 0, by_state
    measured = Counter(t.user_attrs["config_key"] for t in trials
                       if t.state == TrialState.COMPLETE and t.user_attrs.get("status") == "measured")
    n_configs = len(BITS) * len(CACHES.split(","))
    assert len(measured) == n_configs, measured  # the study completed: every configuration has a result
    assert set(measured.values()) == {1}, measured  # ...exactly one stored result each: nothing lost or doubled
    stale = [t for t in trials if t.state == TrialState.FAIL]
    assert len(stale) == 1 and stale[0].user_attrs.get("reason") == "stale", [(t.number, t.user_attrs) for t in stale]
    assert stale[0].user_attrs["worker"].split(":")[1] == str(procs[v].pid)
    # what ran on an engine: every configuration once, the killed one twice (killed + retry), nothing else
    prepared = _prepared_configs(logs)
    assert len(prepared) == n_configs
    twice = {k for k, n in prepared.items() if n > 1}
    assert twice == {killed_key} and prepared[killed_key] == 2, prepared
    # the retry ran on a surviving worker
    assert killed_key in {k for i in (0, survivor) for w, k in _calls(logs[i]) if w == "cache"}
    # every measurement names its worker and that worker's GPU (CUDA_VISIBLE_DEVICES)
    workers = Counter(t.user_attrs.get("worker", "").rsplit(":", 1)[-1] for t in trials
                      if t.user_attrs.get("status") == "measured")
    assert workers["gpu0"] > 0 and set(workers) <= {"gpu0", f"gpu{survivor}"}, workers
    assert stale[0].user_attrs["worker"].endswith(f":gpu{v}")
    _check_report(tmp_path, study, postgres_url, set(measured))


def _check_report(tmp_path: Path, study: str, storage: str, keys: set[str]) -> None:
    """One report (``exl2opt report``) covers every worker's results."""
    import csv

    out_dir = tmp_path / "report"
    r = subprocess.run([sys.executable, "-m", "optimizer", "report", study, "--storage", storage,
                        "--root", str(tmp_path / "studies"), "--out", str(out_dir), "--no-plots"],
                       capture_output=True, text=True, timeout=120, env=_env(tmp_path / "r.log", 0))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = list(csv.DictReader((out_dir / "trials.csv").open()))
    measured = [row["config_key"] for row in rows if row["state"] == "COMPLETE" and row["status"] == "measured"]
    assert sorted(measured) == sorted(keys)
    assert [row["reason"] for row in rows if row["state"] == "FAIL"] == ["stale"]
    assert (out_dir / "pareto.csv").stat().st_size > 0


@pytest.mark.postgres
@pytest.mark.slow
def test_unreachable_postgres_gives_one_clear_line_quickly(tmp_path: Path, models: Path, eval_file: Path) -> None:
    from pg import free_port

    url = f"postgresql+psycopg://someone:s3cret-pw@127.0.0.1:{free_port()}/nodb"
    t0 = time.monotonic()
    r = subprocess.run(_worker_cmd(study="x", root=tmp_path / "s", storage=url, model_args=_model_args(models),
                                   eval_file=eval_file),
                       capture_output=True, text=True, timeout=120, env=_env(tmp_path / "l.log", 0))
    took = time.monotonic() - t0
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("exl2opt: error: cannot reach the study storage"), r.stderr
    assert "s3cret-pw" not in r.stderr + r.stdout
    assert "attempt" in lines[0]
    assert took < 60  # 4 attempts with 1+2+4 s back-off, refused connections


def test_two_workers_on_one_embedded_journal_cooperate(tmp_path: Path, models: Path, eval_file: Path) -> None:
    from optuna.trial import TrialState

    from optimizer.storage import open_storage

    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    root = tmp_path / "studies"
    procs = [subprocess.Popen(_worker_cmd(study="j", root=root, storage=None, model_args=_model_args(models),
                                          eval_file=eval_file),
                              env=_env(log, 0.4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for log in logs]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
    import optuna

    trials = optuna.load_study(study_name="j", storage=open_storage(study="j", url=None, root=root)).get_trials()
    measured = Counter(t.user_attrs["config_key"] for t in trials if t.user_attrs.get("status") == "measured")
    assert len(measured) == 9 and set(measured.values()) == {1}
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    prepared = _prepared_configs(logs)
    assert len(prepared) == 9 and set(prepared.values()) == {1}, prepared


def test_sigint_fails_only_the_current_trial_and_a_rerun_completes(tmp_path: Path, models: Path,
                                                                    eval_file: Path) -> None:
    from optuna.trial import TrialState

    from optimizer.storage import open_storage

    log = tmp_path / "w.log"
    root = tmp_path / "studies"
    cmd = _worker_cmd(study="i", root=root, storage=None, model_args=_model_args(models), eval_file=eval_file)
    p = subprocess.Popen(cmd, env=_env(log, 1.0), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=_default_sigint)  # a background shell may have left SIGINT ignored

    def second_ppl() -> bool:
        return sum(w == "ppl" for w, _ in _calls(log)) >= 2

    _wait(second_ppl, 60, "the second measurement")
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("exl2opt: interrupted: ") and "Traceback" not in err
    (resume,) = printed_commands(last)  # the printed resume command is what the rerun below runs
    import optuna

    storage = open_storage(study="i", url=None, root=root)
    trials = optuna.load_study(study_name="i", storage=storage).get_trials()
    assert [t.user_attrs.get("reason") for t in trials if t.state == TrialState.FAIL] == ["interrupted"]
    assert sum(t.user_attrs.get("status") == "measured" for t in trials) == 1  # the first one is kept
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    r = subprocess.run(argv_of(resume), env=_env(log, 0), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    trials = optuna.load_study(study_name="i", storage=open_storage(study="i", url=None, root=root)).get_trials()
    measured = Counter(t.user_attrs["config_key"] for t in trials if t.user_attrs.get("status") == "measured")
    assert len(measured) == 9 and set(measured.values()) == {1}


def test_oom_fails_the_trial_with_its_reason_and_is_not_retried(tmp_path: Path, models: Path,
                                                                eval_file: Path) -> None:
    from optuna.trial import TrialState

    from optimizer.storage import open_storage

    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    root = tmp_path / "studies"
    cmd = _worker_cmd(study="o", root=root, storage=None, model_args=_model_args(models), eval_file=eval_file)
    for log in logs:  # two runs one after the other: the second must not retry the OOM configuration
        r = subprocess.run(cmd, env=_env(log, 0, FAKE_ENGINE_OOM="q8@2048"), capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
    import optuna

    trials = optuna.load_study(study_name="o", storage=open_storage(study="o", url=None, root=root)).get_trials()
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == len(BITS)  # one q8 configuration per variant
    assert {t.user_attrs["reason"] for t in failed} == {"oom"}
    assert {t.user_attrs["cache"] for t in failed} == {"q8"}
    assert sum(w == "oom" for w, _ in _calls(logs[0])) == len(BITS)
    assert _calls(logs[1]) == []  # nothing left to do, nothing re-tried


def _search_cmd(*, study: str, root: Path, models: Path, eval_file: Path) -> list[str]:
    return [sys.executable, "-m", "optimizer", "search", "--study", study, "--root", str(root),
            "--eval-data", str(eval_file), "--backend-factory", "fake_engine:fake_backend_factory", "--no-report", "--exhaustive",
            "--eval-window", "64", "--eval-windows", "1"] + _model_args(models)


@pytest.mark.slow
def test_second_search_on_one_embedded_study_is_refused_and_the_first_completes(
        tmp_path: Path, models: Path, eval_file: Path) -> None:
    from optuna.trial import TrialState

    from optimizer.storage import open_storage

    root = tmp_path / "studies"
    logs = [tmp_path / "a.log", tmp_path / "b.log", tmp_path / "c.log"]
    first = subprocess.Popen(_search_cmd(study="e", root=root, models=models, eval_file=eval_file),
                             env=_env(logs[0], 0.5), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait(lambda: any(w == "ppl" for w, _ in _calls(logs[0])), 60, "the first search to measure")
    second = subprocess.run(_search_cmd(study="e", root=root, models=models, eval_file=eval_file),
                            env=_env(logs[1], 0), capture_output=True, text=True, timeout=60)
    worker = subprocess.run(_worker_cmd(study="e", root=root, storage=None, model_args=[], eval_file=eval_file),
                            env=_env(logs[2], 0), capture_output=True, text=True, timeout=60)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err[-2000:]
    for r, phrase in ((second, "already being run by another exl2opt process"),
                      (worker, "is being run by exl2opt search")):
        assert r.returncode == 1
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and phrase in lines[0], r.stderr
    assert _calls(logs[1]) == [] and _calls(logs[2]) == []  # the refused ones measured nothing
    import optuna

    trials = optuna.load_study(study_name="e", storage=open_storage(study="e", url=None, root=root)).get_trials()
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING, TrialState.FAIL)]
    measured = Counter(t.user_attrs["config_key"] for t in trials if t.user_attrs.get("status") == "measured")
    assert len(measured) == 9 and set(measured.values()) == {1}


# ----- fast unit checks of the worker layer ---------------------------------------------------------


def test_spec_survives_the_study_record_round_trip(models: Path) -> None:
    """A worker without --model rebuilds exactly the spec (same fingerprint) the first worker stored."""
    import json as _json

    from optimizer.backends.base import EvalProtocol, SpeedProtocol
    from optimizer.sources.local import discover_local
    from optimizer.space import Budget
    from optimizer.study import SearchSpec, spec_from_record, spec_record
    from optimizer.vram import Split

    spec = SearchSpec(variants=tuple(discover_local(models)), budget=Budget(per_device=(8 * 10**9, 6 * 10**9)),
                      split=Split(mode="auto", n_devices=2), contexts=(2048, 4096), caches=("q4",), min_ctx=1024,
                      eval_protocol=EvalProtocol(window=64, n_windows=1, prefill=32, score_chunk=16),
                      speed_protocol=SpeedProtocol(context_fill=512))
    rec = _json.loads(_json.dumps(spec_record(spec)))  # what the storage keeps is JSON
    back = spec_from_record(rec)
    assert back.fingerprint() == spec.fingerprint()
    assert [v.tensors for v in back.variants] == [v.tensors for v in spec.variants]
    assert back.split.label == "auto:2"


def test_safe_url_hides_the_password() -> None:
    from optimizer.storage import safe_url

    shown = safe_url("postgresql+psycopg://user:p%40ss-w0rd@db.example:5432/exl2opt")
    assert "p%40ss-w0rd" not in shown and "p@ss-w0rd" not in shown
    assert "user" in shown and "db.example" in shown


def test_scan_gives_up_a_configuration_after_max_retry_stale_failures() -> None:
    import optuna
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState, create_trial

    from optimizer.study import scan

    study = optuna.create_study(directions=["minimize", "maximize", "maximize"])
    dist = {"x": CategoricalDistribution(("a", "b"))}
    for key, n_stale in (("a", 2), ("b", 1)):
        for _ in range(n_stale):
            study.add_trial(create_trial(params={"x": key}, distributions=dist, state=TrialState.FAIL,
                                         user_attrs={"config_key": key, "status": "failed", "reason": "stale"}))
    led = scan(study, max_retry=1)
    assert led.stale == {"a": 2, "b": 1}
    assert led.done["a"]["status"] == "failed" and "given up" in led.done["a"]["reason"]
    assert "b" not in led.done  # one retry is still due


@pytest.mark.postgres
@pytest.mark.slow
def test_a_stopped_worker_resumed_after_its_trial_went_stale_gives_it_up_cleanly(
        tmp_path: Path, models: Path, eval_file: Path, postgres_url: str) -> None:  # noqa: F811
    """SIGSTOP a worker mid-trial past the grace period, let another finish the study, then SIGCONT it."""
    from optuna.trial import TrialState

    study = "stopped"
    root = tmp_path / "studies"
    logs = [tmp_path / "w0.log", tmp_path / "w1.log"]
    a = subprocess.Popen(
        _worker_cmd(study=study, root=root, storage=postgres_url, model_args=_model_args(models), eval_file=eval_file),
        env=_env(logs[0], 2.0), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait(lambda: any(w == "ppl" for w, _ in _calls(logs[0])), 60, "worker 0 to start measuring")
    a.send_signal(signal.SIGSTOP)
    try:
        b = subprocess.run(_worker_cmd(study=study, root=root, storage=postgres_url, model_args=[],
                                       eval_file=eval_file),
                           env=_env(logs[1], 0), capture_output=True, text=True, timeout=180)
    finally:
        a.send_signal(signal.SIGCONT)
    assert b.returncode == 0, b.stderr[-2000:]
    out, err = a.communicate(timeout=120)
    assert a.returncode == 0, err[-2000:]
    assert "Traceback" not in err and "internal error" not in err and "UpdateFinishedTrialError" not in err
    assert "gives it up" in err
    trials = _trials(postgres_url, study)
    measured = Counter(t.user_attrs["config_key"] for t in trials if t.state == TrialState.COMPLETE
                       and t.user_attrs.get("status") == "measured")
    assert len(measured) == len(BITS) * len(CACHES.split(",")) and set(measured.values()) == {1}
    assert [t.user_attrs.get("reason") for t in trials if t.state == TrialState.FAIL] == ["stale"]


@pytest.mark.postgres
@pytest.mark.slow
def test_one_sampler_search_per_postgres_study(tmp_path: Path, models: Path, eval_file: Path,
                                               postgres_url: str) -> None:  # noqa: F811
    """A search with a sampler (not the workers' claim protocol) holds the study alone, from any machine."""
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    cmd = _search_cmd(study="tpe", root=tmp_path / "a", models=models, eval_file=eval_file) + [
        "--storage", postgres_url, "--sampler", "tpe", "--seed", "1"]
    first = subprocess.Popen(cmd, env=_env(logs[0], 1.0), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait(lambda: any(w == "ppl" for w, _ in _calls(logs[0])), 60, "the first search to measure")
    other_dir = _search_cmd(study="tpe", root=tmp_path / "b", models=models, eval_file=eval_file) + [
        "--storage", postgres_url, "--sampler", "tpe"]
    second = subprocess.run(other_dir, env=_env(logs[1], 0), capture_output=True, text=True, timeout=120)
    worker = subprocess.run(_worker_cmd(study="tpe", root=tmp_path / "c", storage=postgres_url, model_args=[],
                                        eval_file=eval_file), env=_env(logs[1], 0), capture_output=True, text=True,
                            timeout=120)
    first.send_signal(signal.SIGINT)
    first.communicate(timeout=60)
    for r, phrase in ((second, "already being run by another exl2opt process on this database"),
                      (worker, "is being run by exl2opt search on this database")):
        assert r.returncode == 1, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and phrase in lines[0], r.stderr
    assert not _calls(logs[1])  # the refused processes measured nothing
