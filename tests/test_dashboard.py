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
