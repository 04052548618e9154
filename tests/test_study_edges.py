"""Edge cases of the study / worker layer a user of ``exl2opt search`` would hit (fake engine, tiny variants)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest
from exl2_fixtures import TINY_LLAMA, make_exl2_dir
from fake_engine import FakeBackend, FakeEngine

from optimizer.backends.base import EvalProtocol, SpeedProtocol, SpeedResult
from optimizer.errors import BadOptionError, EngineError, EngineOOMError, EvalDataError, StudyError
from optimizer.evaldata import EvalText, load_eval_text
from optimizer.report import write_reports
from optimizer.sources.local import discover_local
from optimizer.space import Budget
from optimizer.storage import study_dir
from optimizer.study import SearchSpec, build_space, open_study, run
from optimizer.units import parse_size
from optimizer.vram import Split


def _cfg() -> dict:
    return dict(TINY_LLAMA, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
                num_attention_heads=16, num_key_value_heads=4, vocab_size=32000, max_position_embeddings=16384)


@pytest.fixture()
def vdir(tmp_path: Path) -> Path:
    d = tmp_path / "models"
    for b in (4.0, 8.0):
        make_exl2_dir(d, f"tiny-{b}bpw", _cfg(), bits=b)
    return d


def _spec(vdir: Path, vram: str = "0.7GiB", **kw) -> SearchSpec:
    return SearchSpec(
        variants=tuple(discover_local(vdir)), budget=Budget(per_device=(parse_size(vram),), overhead=(0,)),
        split=Split(), contexts=kw.pop("contexts", (2048, 8192)), caches=kw.pop("caches", ("fp16", "q4")),
        eval_protocol=EvalProtocol(window=64, n_windows=2, prefill=32, score_chunk=16),
        speed_protocol=SpeedProtocol(context_fill=1024, gen_tokens=16), **kw,
    )


def _text() -> EvalText:
    return EvalText(dataset_id="fake:1", text="hello world " * 50)


def _run(spec: SearchSpec, tmp_path: Path, backend: FakeBackend, **kw):
    kw.setdefault("sampler", "bruteforce")
    return run(spec=spec, study_name="s", backend_factory=lambda v: backend, eval_text=_text,
               root=tmp_path / "studies", **kw)


def _study(tmp_path: Path):
    return open_study(study_name="s", storage_url=None, root=tmp_path / "studies", create=False)


def _feasible(spec: SearchSpec) -> set[str]:
    return {c.key for c in build_space(spec) if c.verdict.fits}


def _states(study) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in study.trials:
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


@dataclass
class FakeFailingEngine(FakeEngine):
    """Raises ``exc`` from perplexity (or speed) for the first ``times`` calls; may return ``ppl_value``."""

    exc: BaseException | None = None
    where: str = "perplexity"
    times: int = 1
    ppl_value: float | None = None

    def _maybe_raise(self, where: str) -> None:
        if self.exc is not None and self.where == where and self.times > 0:
            self.times -= 1
            raise self.exc

    def perplexity(self, *, tokens, protocol):  # type: ignore[override]
        self._maybe_raise("perplexity")
        v = super().perplexity(tokens=tokens, protocol=protocol)
        return v if self.ppl_value is None else self.ppl_value

    def speed(self, *, protocol) -> SpeedResult:  # type: ignore[override]
        self._maybe_raise("speed")
        return super().speed(protocol=protocol)


# ----- engine failures -----------------------------------------------------------------------------


def test_non_oom_engine_error_fails_trial_and_study_continues(vdir: Path, tmp_path: Path) -> None:
    spec = _spec(vdir)
    be = FakeBackend(engine=FakeFailingEngine(exc=EngineError("kernel launch failed"), times=1))
    res = _run(spec, tmp_path, be)
    assert res.exhausted and res.n_failed == 1 and res.n_measured == len(_feasible(spec)) - 1
    study = _study(tmp_path)
    assert "RUNNING" not in _states(study)
    failed = [t for t in study.trials if t.user_attrs.get("status") == "failed"]
    assert len(failed) == 1 and "kernel launch failed" in failed[0].user_attrs["reason"]


def test_unexpected_exception_fails_trial_with_reason_and_is_retried(vdir: Path, tmp_path: Path) -> None:
    spec = _spec(vdir)
    be = FakeBackend(engine=FakeFailingEngine(exc=RuntimeError("bug in backend"), times=1))
    with pytest.raises(RuntimeError):
        _run(spec, tmp_path, be)
    study = _study(tmp_path)
    assert "RUNNING" not in _states(study)
    [bad] = [t for t in study.trials if t.state.name == "FAIL"]
    assert "RuntimeError" in bad.user_attrs["reason"] and "bug in backend" in bad.user_attrs["reason"]
    # the next run (bug fixed) measures that configuration too
    res = _run(spec, tmp_path, FakeBackend())
    assert res.exhausted and res.n_failed == 0
    measured = [t.user_attrs["config_key"] for t in _study(tmp_path).trials if t.user_attrs.get("status") == "measured"]
    assert sorted(measured) == sorted(_feasible(spec))


def test_keyboard_interrupt_in_engine_marks_interrupted_and_is_retried(vdir: Path, tmp_path: Path) -> None:
    spec = _spec(vdir)
    be = FakeBackend(engine=FakeFailingEngine(exc=KeyboardInterrupt(), where="speed", times=1))
    with pytest.raises(KeyboardInterrupt):
        _run(spec, tmp_path, be)
    study = _study(tmp_path)
    assert "RUNNING" not in _states(study)
    assert [t.user_attrs["reason"] for t in study.trials if t.state.name == "FAIL"] == ["interrupted"]
    res = _run(spec, tmp_path, FakeBackend())
    assert res.exhausted and res.n_measured == len(_feasible(spec))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_perplexity_is_a_failed_trial_not_a_result(vdir: Path, tmp_path: Path, bad: float) -> None:
    spec = _spec(vdir)
    be = FakeBackend(engine=FakeFailingEngine(ppl_value=bad))
    res = _run(spec, tmp_path, be)
    study = _study(tmp_path)
    assert res.n_measured == 0 and res.n_failed == len(_feasible(spec))
    fails = [t for t in study.trials if t.user_attrs.get("status") not in ("infeasible",)]
    assert fails and all(t.state.name == "FAIL" and t.user_attrs["status"] == "failed" for t in fails)
    assert all("perplexity" in t.user_attrs["reason"] for t in fails)
    files, front = write_reports(study=study, out_dir=tmp_path / "rep", plots=True)
    assert front == [] and files.trials_csv.is_file()
    # a rerun does not re-measure deterministic failures
    be2 = FakeBackend()
    res2 = _run(spec, tmp_path, be2)
    assert res2.exhausted and be2.engine.calls == []


def test_perplexity_kept_when_speed_ooms_and_reused_next_run(vdir: Path, tmp_path: Path) -> None:
    spec = _spec(vdir)
    be = FakeBackend(engine=FakeFailingEngine(exc=EngineOOMError("oom at fill"), where="speed", times=1))
    res = _run(spec, tmp_path, be, n_trials=1)
    assert res.n_failed == 1
    [failed] = [t for t in _study(tmp_path).trials if t.user_attrs.get("status") == "failed"]
    assert failed.user_attrs["reason"] == "oom" and failed.user_attrs.get("perplexity") is not None
    first_ppl = [k for what, k in be.engine.calls if what == "ppl"]
    # the next run measures the smaller contexts of that (variant, cache) without measuring perplexity again
    be2 = FakeBackend()
    res2 = _run(spec, tmp_path, be2)
    assert res2.exhausted
    again = [k for what, k in be2.engine.calls if what == "ppl"]
    assert first_ppl and first_ppl[0] not in again


# ----- resume ----------------------------------------------------------------------------------------


def test_n_trials_one_repeatedly_until_exhausted(vdir: Path, tmp_path: Path) -> None:
    spec = _spec(vdir)
    feas = _feasible(spec)
    total = 0
    for _ in range(len(feas) + 3):
        res = _run(spec, tmp_path, FakeBackend(), sampler="auto", n_trials=1)
        total += res.n_measured
        assert res.n_measured <= 1
        if res.exhausted:
            break
    assert res.exhausted and total == len(feas)
    study = _study(tmp_path)
    measured = [t.user_attrs["config_key"] for t in study.trials if t.user_attrs.get("status") == "measured"]
    assert sorted(measured) == sorted(feas)
    assert "RUNNING" not in _states(study)


def test_zero_timeout_measures_nothing_and_resume_finishes(vdir: Path, tmp_path: Path) -> None:
    spec = _spec(vdir)
    res = _run(spec, tmp_path, FakeBackend(), timeout=0.0)
    assert res.stop_reason == "timeout" and res.n_measured == 0
    res = _run(spec, tmp_path, FakeBackend(), timeout=60.0)
    assert res.exhausted and res.n_measured == len(_feasible(spec))


def test_resume_refuses_changed_space_and_names_what_changed(vdir: Path, tmp_path: Path) -> None:
    _run(_spec(vdir), tmp_path, FakeBackend(), n_trials=1)
    for changed, spec in (("caches", _spec(vdir, caches=("fp16",))), ("budget", _spec(vdir, vram="0.8GiB")),
                          ("contexts", _spec(vdir, contexts=(2048,)))):
        with pytest.raises(StudyError, match=f"changed: {changed}\\b"):
            _run(spec, tmp_path, FakeBackend())
    # --n-trials / --timeout / --sampler may change
    res = _run(_spec(vdir), tmp_path, FakeBackend(), n_trials=100, timeout=100.0, sampler="tpe")
    assert res.exhausted


def test_resume_after_moving_the_model_directory_is_refused_with_a_hint(vdir: Path, tmp_path: Path) -> None:
    _run(_spec(vdir), tmp_path, FakeBackend(), n_trials=1)
    moved = tmp_path / "moved"
    vdir.rename(moved)
    with pytest.raises(StudyError, match="changed: models"):
        _run(_spec(moved), tmp_path, FakeBackend())


@pytest.mark.parametrize("name", ["../x", "/abs/x", "a/b", "..", ".", "", "a\\b", "x\x00y"])
def test_unsafe_study_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(BadOptionError) as e:  # a usage error: exit 2
        study_dir(study=name, root=tmp_path)
    assert e.value.exit_code == 2


# ----- infeasible only, reports ---------------------------------------------------------------------


def test_everything_infeasible_is_a_clear_outcome_with_reports(vdir: Path, tmp_path: Path) -> None:
    spec = _spec(vdir, vram="0.05GiB")
    assert not _feasible(spec)
    be = FakeBackend()
    res = _run(spec, tmp_path, be)
    assert res.n_feasible == 0 and res.n_measured == 0 and be.engine.calls == []
    assert res.stop_reason == "nothing_fits"
    study = _study(tmp_path)
    files, front = write_reports(study=study, out_dir=tmp_path / "rep", plots=False)
    assert front == []
    lines = files.trials_csv.read_text().splitlines()
    assert len(lines) - 1 == len(build_space(spec)) and all("infeasible" in ln for ln in lines[1:])


def test_report_of_a_study_with_no_trials(tmp_path: Path) -> None:
    study = open_study(study_name="empty", root=tmp_path / "studies")
    files, front = write_reports(study=study, out_dir=tmp_path / "rep", plots=True)
    assert front == [] and files.pareto_csv.read_text().startswith("variant,")


# ----- eval data -------------------------------------------------------------------------------------


def test_parquet_with_a_differently_named_string_column(tmp_path: Path) -> None:
    import pandas as pd

    p = tmp_path / "e.parquet"
    pd.DataFrame({"id": [1, 2], "content": ["alpha", "beta"]}).to_parquet(p)
    assert load_eval_text(path=p).text == "alpha\n\nbeta"


def test_parquet_text_column_skips_missing_rows(tmp_path: Path) -> None:
    import pandas as pd

    p = tmp_path / "e.parquet"
    pd.DataFrame({"text": ["alpha", None, "beta"]}).to_parquet(p)
    assert load_eval_text(path=p).text == "alpha\n\nbeta"


def test_parquet_without_any_text_column(tmp_path: Path) -> None:
    import pandas as pd

    p = tmp_path / "e.parquet"
    pd.DataFrame({"n": [1, 2]}).to_parquet(p)
    with pytest.raises(EvalDataError, match="text column"):
        load_eval_text(path=p)


@pytest.mark.parametrize("content", [b"", b"  \n\n ", b"\xff\xfe\x00bad"])
def test_empty_or_non_utf8_text(tmp_path: Path, content: bytes) -> None:
    p = tmp_path / "e.txt"
    p.write_bytes(content)
    with pytest.raises(EvalDataError):
        load_eval_text(path=p)


def test_huge_eval_file_is_refused_without_reading_it_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from optimizer import evaldata

    monkeypatch.setattr(evaldata, "MAX_EVAL_BYTES", 1000)
    p = tmp_path / "e.txt"
    p.write_text("x" * 5000)
    with pytest.raises(EvalDataError, match="too large"):
        load_eval_text(path=p)


# ----- workers and batches ----------------------------------------------------------------------------


def test_worker_retries_a_configuration_that_hit_an_unexpected_error(vdir: Path, tmp_path: Path) -> None:
    from optimizer.study import run_worker

    spec = _spec(vdir)
    be = FakeBackend(engine=FakeFailingEngine(exc=RuntimeError("bug in backend"), times=1))
    kw = dict(study_name="w", eval_text=_text, root=tmp_path / "studies")
    with pytest.raises(RuntimeError):
        run_worker(spec=spec, backend_factory=lambda v: be, **kw)
    res = run_worker(spec=None, backend_factory=lambda v: FakeBackend(), **kw)
    assert res.exhausted and res.n_failed == 0 and res.n_measured == len(_feasible(spec))


def test_interrupt_leaves_no_asked_batch_trial_running(vdir: Path, tmp_path: Path) -> None:
    spec = _spec(vdir)
    be = FakeBackend(engine=FakeFailingEngine(exc=KeyboardInterrupt(), where="perplexity", times=1))
    with pytest.raises(KeyboardInterrupt):
        _run(spec, tmp_path, be, sampler="tpe", n_trials=50)
    study = _study(tmp_path)
    assert "RUNNING" not in _states(study)
    res = _run(spec, tmp_path, FakeBackend(), sampler="tpe", n_trials=50)
    assert res.exhausted
    measured = [t.user_attrs["config_key"] for t in _study(tmp_path).trials if t.user_attrs.get("status") == "measured"]
    assert sorted(measured) == sorted(_feasible(spec))


@pytest.mark.parametrize("opt", [["--n-trials", "0"], ["--n-trials", "-3"], ["--timeout", "0"], ["--timeout", "-1"]])
def test_search_refuses_nonsense_budgets(vdir: Path, tmp_path: Path, opt: list[str],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    from optimizer.cli import main
    from optimizer.errors import BadOptionError

    with pytest.raises(SystemExit) as ei:
        main(["search", "--model", str(vdir / "tiny-4.0bpw"), "--vram", "1GiB", "--studies-dir", str(tmp_path / "st"),
              "--backend-factory", "fake_engine:fake_backend_factory", "--no-report", *opt])
    assert ei.value.code == BadOptionError.exit_code
    assert opt[0] in capsys.readouterr().err
    assert not (tmp_path / "st").exists()


def test_search_cli_when_nothing_fits_says_so_and_writes_trials_csv(vdir: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from optimizer.cli import main

    root = tmp_path / "st"
    try:
        main(["search", "--model", str(vdir / "tiny-8.0bpw"), "--vram", "0.05GiB", "--studies-dir", str(root),
              "--study", "nf", "--backend-factory", "fake_engine:fake_backend_factory", "--eval-data",
              str(_write(tmp_path / "e.txt", "hello " * 100)), "--min-ctx", "0"])
    except SystemExit as e:
        assert e.code in (0, None)
    out = capsys.readouterr().out
    assert "stopped: nothing_fits" in out
    assert "Nothing fits: the VRAM model rejects all 20 configurations" in out and "larger --vram" in out
    assert "No measured configuration" not in out  # no recommendation when nothing was measured
    rows = (root / "nf" / "trials.csv").read_text().splitlines()[1:]
    assert rows and all(",infeasible," in r for r in rows)


def _write(p: Path, text: str) -> Path:
    p.write_text(text)
    return p


def test_leftover_waiting_trial_of_a_finished_configuration_is_not_measured_again(vdir: Path, tmp_path: Path) -> None:
    spec = _spec(vdir)
    _run(spec, tmp_path, FakeBackend(), n_trials=1)
    study = _study(tmp_path)
    [done] = [t for t in study.trials if t.user_attrs.get("status") == "measured"]
    study.enqueue_trial(dict(done.params))  # e.g. a run killed between enqueue and ask
    be = FakeBackend()
    res = _run(spec, tmp_path, be)
    assert res.exhausted
    measured = [t.user_attrs["config_key"] for t in _study(tmp_path).trials if t.user_attrs.get("status") == "measured"]
    assert sorted(measured) == sorted(_feasible(spec))
    prepared = [k for what, k in be.engine.calls if what == "cache"]
    assert len(prepared) == len(set(prepared)) == len(_feasible(spec)) - 1
    assert "WAITING" not in _states(_study(tmp_path)) and "RUNNING" not in _states(_study(tmp_path))
    for t in _study(tmp_path).trials:  # every trial's params name the configuration its attributes describe
        if t.user_attrs.get("status") == "measured":
            assert t.user_attrs["config_key"].endswith(f"ctx={t.params['max_seq_len']}|cache={t.params['cache']}|split=1gpu")


def test_worker_refuses_a_nonpositive_timeout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from optimizer.cli import main
    from optimizer.errors import BadOptionError

    with pytest.raises(SystemExit) as ei:
        main(["worker", "--study", "w", "--root", str(tmp_path / "st"), "--timeout", "0"])
    assert ei.value.code == BadOptionError.exit_code and "--timeout" in capsys.readouterr().err
