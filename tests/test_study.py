"""The study loop driven by the deterministic fake engine (tests/fake_engine.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from exl2_fixtures import TINY_LLAMA, make_exl2_dir
from fake_engine import FakeBackend, fake_ppl, fake_speed

from optimizer.backends.base import EvalProtocol, SpeedProtocol
from optimizer.evaldata import EvalText
from optimizer.formats import RuntimeOptions
from optimizer.sources.local import discover_local
from optimizer.space import Budget
from optimizer.study import SearchSpec, build_space, choose_mode, open_study, run
from optimizer.units import parse_size
from optimizer.vram import Split

BITS = (3.0, 4.0, 6.0, 8.0)
ROOT = Path(__file__).resolve().parents[1]


def _big_config() -> dict:
    # big enough that the weights matter against a small budget
    return dict(TINY_LLAMA, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
                num_attention_heads=16, num_key_value_heads=4, vocab_size=32000, max_position_embeddings=16384)


@pytest.fixture()
def variants_dir(tmp_path: Path) -> Path:
    d = tmp_path / "models"
    for b in BITS:
        make_exl2_dir(d, f"tiny-{b}bpw", _big_config(), bits=b)
    return d


def _spec(variants_dir: Path, vram: str = "0.7GiB", **kw) -> SearchSpec:
    return SearchSpec(
        variants=tuple(discover_local(variants_dir)), budget=Budget(per_device=(parse_size(vram),), overhead=(0,)),
        split=Split(), contexts=kw.pop("contexts", (2048, 8192, 16384)), caches=kw.pop("caches", ("fp16", "q4", "q8")),
        eval_protocol=EvalProtocol(window=64, n_windows=2, prefill=32, score_chunk=16),
        speed_protocol=SpeedProtocol(context_fill=1024, gen_tokens=16),
        # flash-attn: no chunk^2 attention scores, so the small budget leaves the intended mix of fits
        runtime=kw.pop("runtime", RuntimeOptions(flash_attn=True)), **kw,
    )


def _text() -> EvalText:
    return EvalText(dataset_id="fake:1", text="hello world " * 50)


def _run(spec: SearchSpec, tmp_path: Path, backend: FakeBackend, **kw):
    return run(spec=spec, study_name="s", backend_factory=lambda v: backend, eval_text=_text,
               root=tmp_path / "studies", **kw)


def _front(points: dict[str, tuple[float, float, float]]) -> set[str]:
    """Brute-force non-dominated set (ppl min, gen max, ctx max)."""
    out = set()
    for k, (p, g, c) in points.items():
        dominated = any((p2 <= p and g2 >= g and c2 >= c) and (p2, g2, c2) != (p, g, c)
                        for k2, (p2, g2, c2) in points.items() if k2 != k)
        if not dominated:
            out.add(k)
    return out


def test_space_has_infeasible_and_feasible(variants_dir: Path) -> None:
    cands = build_space(_spec(variants_dir))
    fits = [c for c in cands if c.verdict.fits]
    assert 0 < len(fits) < len(cands)


def test_infeasible_never_loaded_and_nothing_measured_twice(variants_dir: Path, tmp_path: Path) -> None:
    spec = _spec(variants_dir)
    be = FakeBackend()
    res = _run(spec, tmp_path, be, sampler="bruteforce")
    cands = build_space(spec)
    feas = {c.key for c in cands if c.verdict.fits}
    assert res.exhausted and res.n_measured == len(feas)
    prepared = [k for what, k in be.engine.calls if what == "cache"]
    assert len(prepared) == len(set(prepared)) == len(feas)
    infeasible = {c.key for c in cands if not c.verdict.fits}
    for c in cands:
        if c.key in infeasible:
            assert f"{c.config.variant.key}|{c.config.cache}|{c.config.max_seq_len}" not in prepared
    ppl_calls = [k for what, k in be.engine.calls if what == "ppl"]
    assert len(ppl_calls) == len(set(ppl_calls))
    # each variant with a feasible configuration is loaded exactly once (single GPU)
    n_var = len({c.config.variant.key for c in cands if c.verdict.fits})
    assert be.engine.loads == n_var == res.model_loads
    # a rerun finds the space exhausted and measures nothing
    be2 = FakeBackend()
    res2 = _run(spec, tmp_path, be2, sampler="bruteforce")
    assert res2.n_measured == 0 and res2.exhausted and be2.engine.calls == []


def test_infeasible_recorded_with_reason_and_constraint(variants_dir: Path, tmp_path: Path) -> None:
    spec = _spec(variants_dir)
    _run(spec, tmp_path, FakeBackend(), sampler="auto", n_trials=3)
    study = open_study(study_name="s", storage_url=None, root=tmp_path / "studies", create=False)
    inf = [t for t in study.trials if t.user_attrs.get("status") == "infeasible"]
    assert inf and all(t.constraints["vram_excess_gib"] > 0 and t.user_attrs["reason"] for t in inf)
    assert all(t.user_attrs["predicted"][0]["total"] > t.user_attrs["predicted"][0]["budget"] for t in inf)
    assert study.best_trials and all(t.user_attrs["status"] == "measured" for t in study.best_trials)


@pytest.mark.parametrize("sampler", ["bruteforce", "tpe"])
def test_pareto_equals_bruteforce_front(variants_dir: Path, tmp_path: Path, sampler: str) -> None:
    spec = _spec(variants_dir)
    res = _run(spec, tmp_path, FakeBackend(), sampler=sampler, n_trials=200)
    assert res.exhausted
    truth: dict[str, tuple[float, float, float]] = {}
    for c in build_space(spec):
        if c.verdict.fits:
            fill = min(1024, c.config.max_seq_len - 16)
            truth[c.key] = (fake_ppl(c.config.variant, c.config.cache),
                            fake_speed(c.config.variant, c.config.cache, "1gpu", fill)[1], float(c.config.max_seq_len))
    study = open_study(study_name="s", storage_url=None, root=tmp_path / "studies", create=False)
    got = {t.user_attrs["config_key"] for t in study.best_trials}
    assert got == _front(truth)
    # TPE duplicates were answered from the store, not re-measured
    measured = [t.user_attrs["config_key"] for t in study.trials if t.user_attrs.get("status") == "measured"]
    assert len(measured) == len(set(measured)) == len(truth)


def test_auto_uses_tpe_when_budget_is_small() -> None:
    assert choose_mode(sampler="auto", n_todo=10, n_trials=20) == "enumerate"
    assert choose_mode(sampler="auto", n_todo=10, n_trials=None) == "enumerate"
    assert choose_mode(sampler="auto", n_todo=30, n_trials=5) == "tpe"


def test_oom_fails_trial_and_study_continues(variants_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_ENGINE_OOM", "q8@8192")
    spec = _spec(variants_dir)
    res = _run(spec, tmp_path, FakeBackend(), sampler="bruteforce")
    assert res.n_failed > 0 and res.exhausted
    study = open_study(study_name="s", storage_url=None, root=tmp_path / "studies", create=False)
    failed = [t for t in study.trials if t.state.name == "FAIL"]
    assert failed and all(t.user_attrs["reason"] == "oom" for t in failed)
    assert res.n_measured + res.n_failed == res.n_feasible


def test_settings_change_is_refused(variants_dir: Path, tmp_path: Path) -> None:
    from optimizer.errors import StudyError

    _run(_spec(variants_dir), tmp_path, FakeBackend(), n_trials=1)
    with pytest.raises(StudyError):
        _run(_spec(variants_dir, vram="2GiB"), tmp_path, FakeBackend(), n_trials=1)


def _search_cmd(models: Path, studies: Path) -> list[str]:
    return [sys.executable, "-m", "optimizer", "search", "--model", str(models), "--vram", "0.7GiB",
            "--overhead", "1MiB", "--flash-attn", "--ctx", "2048,8192,16384", "--cache", "fp16,q4,q8", "--study", "k",
            "--root", str(studies), "--eval-data", str(studies.parent / "eval.txt"), "--sampler", "bruteforce",
            "--backend-factory", "fake_engine:fake_backend_factory", "--no-report"]


@pytest.mark.slow
def test_sigkill_then_resume_keeps_finished_trials(variants_dir: Path, tmp_path: Path) -> None:
    studies = tmp_path / "studies"
    (tmp_path / "eval.txt").write_text("some evaluation text " * 100)
    log = tmp_path / "calls.jsonl"
    env = dict(os.environ, FAKE_ENGINE_LOG=str(log), FAKE_ENGINE_DELAY="0.4", PYTHONPATH=str(ROOT / "tests"))
    p = subprocess.Popen(_search_cmd(variants_dir, studies), cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline:
        if log.exists() and sum(1 for line in log.read_text().splitlines() if '"ppl"' in line) >= 3:
            break
        time.sleep(0.1)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    study = open_study(study_name="k", storage_url=None, root=studies, create=False)
    done_before = {t.user_attrs["config_key"] for t in study.trials if t.user_attrs.get("status") == "measured"}
    assert done_before, "the search should have finished some trials before the kill"
    n_calls_before = len(log.read_text().splitlines())
    env["FAKE_ENGINE_DELAY"] = "0"
    r = subprocess.run(_search_cmd(variants_dir, studies), cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    study = open_study(study_name="k", storage_url=None, root=studies, create=False)
    measured = [t.user_attrs["config_key"] for t in study.trials if t.user_attrs.get("status") == "measured"]
    assert done_before <= set(measured)
    assert len(measured) == len(set(measured))
    assert not [t for t in study.trials if t.state.name == "RUNNING"]
    after = [json.loads(line) for line in log.read_text().splitlines()[n_calls_before:]]
    cached = {k for what, k in after if what == "cache"}
    for key in done_before:
        v, ctx, cache = key.split("|")[0], key.split("ctx=")[1].split("|")[0], key.split("cache=")[1].split("|")[0]
        assert f"{v}|{cache}|{ctx}" not in cached


def test_sqlite_storage_url(variants_dir: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    spec = _spec(variants_dir)
    res = run(spec=spec, study_name="q", backend_factory=lambda v: FakeBackend(), eval_text=_text,
              root=tmp_path / "studies", storage_url=url, n_trials=2)
    assert res.n_measured == 2 and not res.exhausted and res.stop_reason == "n_trials"
    res2 = run(spec=spec, study_name="q", backend_factory=lambda v: FakeBackend(), eval_text=_text,
               root=tmp_path / "studies", storage_url=url, n_trials=2)
    study = open_study(study_name="q", storage_url=url, root=tmp_path / "studies", create=False)
    measured = [t.user_attrs["config_key"] for t in study.trials if t.user_attrs.get("status") == "measured"]
    assert res2.n_measured == 2 and len(measured) == len(set(measured)) == 4
    assert (tmp_path / "studies" / "q" / "variants.json").is_file()


def test_sweep_stale_fails_dead_pid_trials(tmp_path: Path) -> None:
    from optimizer.storage import sweep_stale, this_host

    study = open_study(study_name="z", storage_url=None, root=tmp_path)
    t = study.ask()
    t.set_user_attr("host", this_host())
    t.set_user_attr("pid", 2**22 + 12345)  # above the default pid_max: never alive
    alive = study.ask()
    alive.set_user_attr("host", this_host())
    alive.set_user_attr("pid", os.getpid())
    assert sweep_stale(study) == [t.number]
    states = {x.number: x.state.name for x in study.trials}
    assert states == {t.number: "FAIL", alive.number: "RUNNING"}


def test_eval_data_local_files_and_offline_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pandas as pd

    from optimizer.errors import EvalDataError
    from optimizer.evaldata import load_eval_text

    txt = tmp_path / "e.txt"
    txt.write_text("alpha beta\n")
    et = load_eval_text(path=txt)
    assert et.text == "alpha beta\n" and et.dataset_id.startswith("file:e.txt:")
    pq = tmp_path / "e.parquet"
    pd.DataFrame({"text": ["one", "two"]}).to_parquet(pq)
    assert load_eval_text(path=pq).text == "one\n\ntwo"
    with pytest.raises(EvalDataError):
        load_eval_text(path=tmp_path / "e.csv")
    # offline: in a child process, because huggingface_hub and datasets read HF_HUB_OFFLINE once, at
    # import, and would stay offline for every later test of this process
    probe = ("from optimizer.errors import EvalDataError\nfrom optimizer.evaldata import load_eval_text\n"
             "try:\n    load_eval_text(path=None)\nexcept EvalDataError as e:\n    print(str(e))\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    msg = out.stdout.strip()
    assert "--eval-data" in msg and "\n" not in msg


def test_cli_search_without_gpu_is_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch = pytest.importorskip("torch")
    from optimizer.cli import main

    if torch.cuda.is_available():  # pragma: no cover
        pytest.skip("CUDA present")
    example = ROOT / "studies" / "examples" / "Smaug-34B-v0.1-3.0bpw-h6-exl2"
    with pytest.raises(SystemExit) as ei:
        main(["search", "--model", str(example), "--vram", "24GB", "--studies-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert ei.value.code == 1 and err.count("\n") == 1 and "CUDA GPU" in err
    assert not list(tmp_path.iterdir())  # no study was created


def test_cli_search_writes_reports_and_resumes(variants_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from optimizer.cli import main

    studies = tmp_path / "studies"
    (tmp_path / "eval.txt").write_text("evaluation text " * 50)
    cmd = _search_cmd(variants_dir, studies)[3:]  # drop "python -m optimizer"
    cmd.remove("--no-report")
    main([*cmd, "--n-trials", "3"])
    out = capsys.readouterr().out
    assert "measured 3" in out and "stopped: n_trials" in out
    for name in ("pareto.csv", "trials.csv", "pareto.png", "report.html", "variants.json", "journal.log"):
        assert (studies / "k" / name).is_file(), name
    main(cmd)
    out = capsys.readouterr().out
    assert "stopped: exhausted" in out and "measured 3," not in out


def test_perplexity_from_a_shrunken_window_is_not_reused_for_longer_contexts(variants_dir: Path, tmp_path: Path) -> None:
    """A context shorter than the eval window measures with a shrunken window (engines clamp it); that
    number must not stand in for contexts that run the full window, and vice versa."""
    spec = _spec(variants_dir, vram="4GiB", contexts=(48, 2048), caches=("fp16",), min_ctx=0)
    be = FakeBackend()
    _run(spec, tmp_path, be, sampler="bruteforce")
    study = open_study(study_name="s", storage_url=None, root=tmp_path / "studies", create=False)
    measured = [t.user_attrs for t in study.trials if t.user_attrs.get("status") == "measured"]
    by_ctx = {}
    for ua in measured:
        by_ctx.setdefault(int(ua["max_seq_len"]), set()).add(ua["ppl_key"])
    assert by_ctx[48] and by_ctx[2048] and not (by_ctx[48] & by_ctx[2048])
    assert all("w=48|" in k for k in by_ctx[48]) and all("w=64|" in k for k in by_ctx[2048])
    n_variants = len({ua["variant"] for ua in measured})
    assert len([k for what, k in be.engine.calls if what == "ppl"]) == 2 * n_variants
    assert EvalProtocol(window=64, prefill=32).fitted(100) == EvalProtocol(window=64, prefill=32)
    assert EvalProtocol(window=64, prefill=40).fitted(48) == EvalProtocol(window=48, prefill=24)
