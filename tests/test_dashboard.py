"""optuna-dashboard shows a true study: rejected configurations are PRUNED trials without values, so its
plots hold only measured objective values, and its Pareto set is exl2opt's front."""

from __future__ import annotations

from pathlib import Path

import pytest
from dashboard_util import check_served_values, served_study
from test_report import make_fake_study

from optimizer.report.rows import pareto_rows, trial_rows
from optimizer.study import open_study


def test_dashboard_serves_measured_values_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = make_fake_study(tmp_path, monkeypatch)
    study = open_study(study_name="r", storage_url=None, root=root, create=False)
    rows = trial_rows(study)
    assert any(r["status"] == "infeasible" and r["state"] == "PRUNED" for r in rows)
    front = {r["config_key"] for r in pareto_rows(rows, {})}
    detail = served_study(root / "r" / "journal.log", "r")
    assert len(detail["trials"]) == len(rows)
    check_served_values(detail, front)


def test_resume_of_a_study_with_pruned_rejections_measures_nothing_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PRUNED rejections count as done: a second run neither re-records nor measures anything."""
    from fake_engine import FakeBackend

    from optimizer.evaldata import EvalText
    from optimizer.study import run

    root, spec = make_fake_study(tmp_path, monkeypatch)
    n = len(open_study(study_name="r", storage_url=None, root=root, create=False).trials)
    be = FakeBackend()
    res = run(spec=spec, study_name="r", backend_factory=lambda v: be, root=root,
              eval_text=lambda: EvalText(dataset_id="fake", text="abc " * 100), sampler="bruteforce")
    assert res.exhausted and res.n_measured == 0 and be.engine.calls == []
    assert len(open_study(study_name="r", storage_url=None, root=root, create=False).trials) == n


def test_gp_proposes_the_same_with_pruned_rejections_as_with_placeholders() -> None:
    """GPSampler reads only COMPLETE trials: through the study view it sees PRUNED rejections as the
    COMPLETE placeholder trials of before, so it proposes exactly the same configurations."""
    pytest.importorskip("scipy")
    import optuna
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState, create_trial

    from optimizer.study.samplers import make_sampler
    from optimizer.study.trials import CONSTRAINT, PLACEHOLDER_VALUES

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    dists = {"variant": CategoricalDistribution(["a", "b", "c", "d"]), "ctx": CategoricalDistribution([512, 1024, 2048, 4096]),
             "cache": CategoricalDistribution(["f16", "q8_0", "q4_0"])}

    def value(p: dict) -> list[float]:
        q = {"a": 3.0, "b": 4.0, "c": 5.0, "d": 8.0}[p["variant"]] + {"f16": 0.5, "q8_0": 0.3, "q4_0": 0.0}[p["cache"]]
        return [10 + 20 / q, 100 / q, float(p["ctx"])]

    def study(pruned: bool, sampler: object) -> optuna.Study:
        s = optuna.create_study(directions=["minimize", "maximize", "maximize"], sampler=sampler)  # type: ignore[arg-type]
        n = 0
        for v in "abcd":
            for ctx in (512, 1024, 2048, 4096):
                for cache in ("f16", "q8_0", "q4_0"):
                    p = {"variant": v, "ctx": ctx, "cache": cache}
                    if v == "d" and (ctx >= 2048 or cache == "f16"):  # what the VRAM model rejects
                        ua = {"status": "infeasible"}
                        s.add_trial(create_trial(state=TrialState.PRUNED, params=p, distributions=dists, user_attrs=ua,
                                                 constraints={CONSTRAINT: 1.0}) if pruned else
                                    create_trial(values=list(PLACEHOLDER_VALUES), params=p, distributions=dists, user_attrs=ua,
                                                 constraints={CONSTRAINT: 1.0}))
                    elif (n := n + 1) % 3 == 0:  # a third of the rest measured
                        s.add_trial(create_trial(values=value(p), params=p, distributions=dists, user_attrs={"status": "measured"},
                                                 constraints={CONSTRAINT: -0.1}))
        return s

    before = study(False, optuna.samplers.GPSampler(seed=7, deterministic_objective=True))
    now = study(True, make_sampler("gp", seed=7))
    for _ in range(4):
        a, b = before.ask(dists), now.ask(dists)
        assert a.params == b.params
        for s, t in ((before, a), (now, b)):
            t.set_constraint(CONSTRAINT, -0.1)
            s.tell(t, value(t.params))
