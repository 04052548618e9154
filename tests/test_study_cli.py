"""``exl2opt search`` / ``worker`` as a user meets them: one option table, commands printed for the user
that work when run, honest endings, SIGTERM, one run per study on SQLite, a damaged stored spec.

Every process runs the real CLI (``python -m optimizer``) against the fake engine (tests/fake_engine.py).
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
from printed import argv_of, printed_commands

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
SEARCH_ONLY = {"--sampler", "--seed", "--no-report", "--predict-only"}
WORKER_ONLY = {"--heartbeat", "--grace", "--max-retry", "--poll"}
N_CONFIGS = 6  # 3 variants x 2 cache modes x 1 context


@pytest.fixture()
def models(tmp_path: Path) -> Path:
    d = tmp_path / "models"
    for b in (3.0, 4.0, 5.0):
        make_exl2_dir(d, f"tiny-{b}bpw", dict(TINY_LLAMA), bits=b)
    return d


@pytest.fixture()
def eval_file(tmp_path: Path) -> Path:
    f = tmp_path / "eval.txt"
    f.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    return f


def _env(tmp_path: Path, delay: float = 0.0, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["FAKE_ENGINE_LOG"] = str(tmp_path / "engine.log")
    env["FAKE_ENGINE_DELAY"] = str(delay)
    for k in ("FAKE_ENGINE_OOM", "FAKE_ENGINE_ERROR", "FAKE_ENGINE_TRANSIENT", "FAKE_ENGINE_EXTRA_BYTES",
              "EXL2OPT_STORAGE"):
        env.pop(k, None)
    env.update(extra)
    return env


def _search(models: Path, eval_file: Path, root: Path, *more: str) -> list[str]:
    """``search`` measuring every configuration (--exhaustive: these tests count measurements)."""
    return [sys.executable, "-m", "optimizer", "search", "-m", str(models), "--vram", "8GB", "--ctx", "2048",
            "--cache", "fp16,q4", "--study", "s", "--studies-dir", str(root), "--eval-data", str(eval_file),
            "--backend-factory", "fake_engine:fake_backend_factory", "--exhaustive", "--no-report", *more]


def _run(cmd: list[str], env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=180)


def _calls(log: Path) -> list[tuple[str, str]]:
    return [tuple(json.loads(x)) for x in log.read_text().splitlines() if x.strip()] if log.exists() else []  # type: ignore[misc]


def _wait(pred: Any, timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _trials(root: Path, study: str = "s", url: str | None = None) -> list[Any]:
    import optuna

    from optimizer.storage import open_storage

    return optuna.load_study(study_name=study, storage=open_storage(study=study, url=url, root=root)).get_trials()


def test_search_and_worker_have_the_same_options_from_one_table() -> None:
    import typer.main

    from optimizer.cli import app

    group = typer.main.get_command(app)
    opts = {}
    for name in ("search", "worker"):
        cmd = group.commands[name]  # type: ignore[attr-defined]
        opts[name] = {o: (tuple(p.opts), p.help, p.default) for p in cmd.params for o in p.opts}
    assert set(opts["search"]) >= SEARCH_ONLY and set(opts["worker"]) >= WORKER_ONLY
    shared_search = {k: v for k, v in opts["search"].items() if k not in SEARCH_ONLY}
    shared_worker = {k: v for k, v in opts["worker"].items() if k not in WORKER_ONLY}
    assert shared_search == shared_worker  # same names, same help, same defaults
    for o in ("--n-gpu-layers", "--studies-dir", "--root", "--storage", "--model", "--eval-data", "--min-ctx"):
        assert o in shared_worker


@pytest.mark.slow
def test_every_printed_command_runs(tmp_path: Path, models: Path, eval_file: Path) -> None:
    """Resume, worker and report commands printed by search and worker run as printed (non-default
    studies directory, local eval text, a test engine)."""
    from optimizer.study.locks import run_lock_for

    root = tmp_path / "my studies"
    env = _env(tmp_path)
    outputs: list[str] = []
    first = _run(_search(models, eval_file, root, "--n-trials", "2"), env)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "Stopped by --n-trials with 4 configuration(s) left" in first.stdout
    outputs.append(first.stdout + first.stderr)
    (resume,) = printed_commands(first.stdout)
    assert resume.startswith("exl2opt search --study s --studies-dir ") and "-m " not in resume
    r = _run(argv_of(resume), env)  # the spec is read from the study: no model options needed
    assert r.returncode == 0, r.stderr[-2000:]
    outputs.append(r.stdout + r.stderr)
    measured = Counter(t.user_attrs["config_key"] for t in _trials(root) if t.user_attrs.get("status") == "measured")
    assert len(measured) == N_CONFIGS and set(measured.values()) == {1}
    # a worker while another worker holds the study: search is refused and names the worker command
    lock = run_lock_for(study_name="s", storage_url=None, root=root)
    assert lock is not None
    lock.acquire(exclusive=False)
    try:
        busy = _run(_search(models, eval_file, root), env)
    finally:
        lock.release()
    assert busy.returncode == 1 and len(busy.stderr.strip().splitlines()) == 1, busy.stderr
    outputs.append(busy.stderr)
    (join,) = printed_commands(busy.stderr)
    w = _run(argv_of(join), env)
    assert w.returncode == 0, w.stderr[-2000:]
    outputs.append(w.stdout + w.stderr)
    assert "Report: exl2opt report s --studies-dir " in w.stdout
    ran = {resume, join}
    for cmd in {c for out in outputs for c in printed_commands(out)} - ran:
        res = _run(argv_of(cmd), env)
        assert res.returncode == 0, (cmd, res.stderr[-2000:])
        ran.add(cmd)
    assert any(c.startswith("exl2opt report s ") for c in ran)
    assert (root / "s" / "trials.csv").is_file()


@pytest.mark.slow
def test_sigterm_is_handled_like_ctrl_c(tmp_path: Path, models: Path, eval_file: Path) -> None:
    from optuna.trial import TrialState

    root = tmp_path / "st"
    env = _env(tmp_path, delay=1.0)
    p = subprocess.Popen(_search(models, eval_file, root), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    log = tmp_path / "engine.log"
    _wait(lambda: sum(w == "ppl" for w, _ in _calls(log)) >= 2, 60, "the second measurement")
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143, err
    ours = [line for line in err.splitlines() if line.startswith("exl2opt")]
    assert len(ours) == 1 and ours[0].startswith("exl2opt: terminated (SIGTERM): "), err
    assert "Traceback" not in err
    trials = _trials(root)
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert [t.user_attrs.get("reason") for t in trials if t.state == TrialState.FAIL] == ["interrupted"]
    (resume,) = printed_commands(ours[0])
    r = _run(argv_of(resume), _env(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]


def test_all_failed_says_so_with_the_most_common_reason(tmp_path: Path, models: Path, eval_file: Path) -> None:
    r = _run(_search(models, eval_file, tmp_path / "st"), _env(tmp_path, FAKE_ENGINE_ERROR="exllamav2 is not built"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"All {N_CONFIGS} configurations that fit the budget failed" in r.stdout
    assert f"({N_CONFIGS} of {N_CONFIGS}): exllamav2 is not built" in r.stdout
    assert "not a VRAM budget problem" in r.stdout and "larger --vram" not in r.stdout


def test_transient_failures_are_measured_again_on_resume(tmp_path: Path, models: Path, eval_file: Path) -> None:
    root = tmp_path / "st"
    r = _run(_search(models, eval_file, root), _env(tmp_path, FAKE_ENGINE_ERROR="org/M: cannot download (ConnectError)",
                                                    FAKE_ENGINE_TRANSIENT="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{N_CONFIGS} configuration(s) failed for a passing reason (org/M: cannot download" in r.stdout
    assert "All " not in r.stdout  # not reported as final failures
    (resume,) = printed_commands(r.stdout)
    again = _run(argv_of(resume), _env(tmp_path))
    assert again.returncode == 0, again.stderr[-2000:]
    measured = {t.user_attrs["config_key"] for t in _trials(root) if t.user_attrs.get("status") == "measured"}
    assert len(measured) == N_CONFIGS


def test_a_worker_does_not_loop_on_transient_failures(tmp_path: Path, models: Path, eval_file: Path) -> None:
    cmd = [sys.executable, "-m", "optimizer", "worker", "--study", "w", "--studies-dir", str(tmp_path / "st"),
           "-m", str(models), "--vram", "8GB", "--ctx", "2048", "--cache", "fp16,q4", "--eval-data", str(eval_file),
           "--backend-factory", "fake_engine:fake_backend_factory", "--poll", "0.2"]
    r = _run(cmd, _env(tmp_path, FAKE_ENGINE_ERROR="hub unreachable", FAKE_ENGINE_TRANSIENT="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{N_CONFIGS} configuration(s) failed for a passing reason (hub unreachable)" in r.stdout
    assert sum(w == "error" for w, _ in _calls(tmp_path / "engine.log")) == N_CONFIGS  # each tried once here


def test_all_oom_points_at_the_budget(tmp_path: Path, models: Path, eval_file: Path) -> None:
    r = _run(_search(models, eval_file, tmp_path / "st"), _env(tmp_path, FAKE_ENGINE_OOM="fp16@2048,q4@2048"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"All {N_CONFIGS} configurations that fit the budget failed" in r.stdout and "): oom." in r.stdout
    assert "smaller --vram or a larger --overhead" in r.stdout


def test_a_damaged_stored_spec_is_one_clear_line(tmp_path: Path, models: Path, eval_file: Path) -> None:
    import optuna

    from optimizer.storage import open_storage

    root = tmp_path / "st"
    env = _env(tmp_path)
    assert _run(_search(models, eval_file, root, "--n-trials", "1"), env).returncode == 0
    storage = open_storage(study="s", url=None, root=root)
    sid = optuna.load_study(study_name="s", storage=storage)._study_id
    for bad in ({"variants": "x", "budget": 3}, ["not", "a", "record"]):
        storage.set_study_user_attr(sid, "spec", bad)
        r = _run([sys.executable, "-m", "optimizer", "worker", "--study", "s", "--studies-dir", str(root),
                  "--eval-data", str(eval_file), "--backend-factory", "fake_engine:fake_backend_factory"], env)
        assert r.returncode == 1, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "search settings stored in study 's' are damaged" in lines[0], r.stderr


@pytest.mark.slow
def test_two_searches_on_one_sqlite_url_from_different_directories(tmp_path: Path, models: Path,
                                                                   eval_file: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = subprocess.Popen(_search(models, eval_file, tmp_path / "a" / "studies", "--storage", url),
                             env=_env(tmp_path, delay=0.5), cwd=tmp_path / "a", stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    _wait(lambda: any(w == "ppl" for w, _ in _calls(tmp_path / "engine.log")), 60, "the first search to measure")
    second = _run(_search(models, eval_file, tmp_path / "b" / "studies", "--storage", url), _env(tmp_path),
                  cwd=tmp_path / "b")
    out, err = first.communicate(timeout=180)
    assert first.returncode == 0, err[-2000:]
    assert second.returncode == 1 and "already being run by another exl2opt process" in second.stderr
    measured = Counter(t.user_attrs["config_key"] for t in _trials(tmp_path, url=url)
                       if t.user_attrs.get("status") == "measured")
    assert len(measured) == N_CONFIGS and set(measured.values()) == {1}
    assert sum(w == "ppl" for w, _ in _calls(tmp_path / "engine.log")) == N_CONFIGS  # nothing measured twice


def test_predicted_to_fit_but_measured_over_budget(tmp_path: Path, models: Path, eval_file: Path) -> None:
    """The fake engine reports more memory than predicted: the trial is measured, stays off the front."""
    import csv

    from optuna.trial import TrialState

    root = tmp_path / "st"
    r = _run([*_search(models, eval_file, root)[:-1]], _env(tmp_path, FAKE_ENGINE_EXTRA_BYTES=str(8 * 10**9)))
    assert r.returncode == 0, r.stderr[-2000:]
    trials = [t for t in _trials(root) if t.state == TrialState.COMPLETE and t.user_attrs.get("status") == "measured"]
    assert len(trials) == N_CONFIGS
    for t in trials:
        assert t.user_attrs["predicted_fits"] is True
        assert t.constraints["vram_excess_gib"] > 0  # over the budget as measured, not as predicted
        peak = t.user_attrs["measured"][0]["peak_allocated"]
        assert peak > t.user_attrs["predicted"][0]["total"]
    assert list(csv.DictReader((root / "s" / "pareto.csv").open())) == []  # nothing measured fits
    assert "No measured configuration fits" in r.stdout


def test_the_gpu_list_hint_runs(tmp_path: Path) -> None:
    example = ROOT / "studies" / "examples" / "Smaug-34B-v0.1-3.0bpw-h6-exl2"
    r = _run([sys.executable, "-m", "optimizer", "fit", "-m", str(example), "--vram", "15GB", "--gpu", "NoSuchGPU"],
             _env(tmp_path))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    (hint,) = printed_commands(r.stderr)
    listed = _run(argv_of(hint), _env(tmp_path))
    assert listed.returncode == 0 and "T4" in listed.stdout, listed.stderr
