"""Reports of a study: pareto.csv, trials.csv, pareto.png, report.html and a terminal recommendation.

Everything is rebuilt from the study storage alone (trial user attributes plus the study's
``variants`` user attribute), so ``exl2opt report STUDY`` works without the original sources.
Modules: :mod:`.rows` (rows, front, noise, CSV), :mod:`.text` (recommendation), :mod:`.png`
(pareto.png), :mod:`.page` (report.html, one self-contained page).

Open the study interactively with optuna-dashboard (``pip install optuna-dashboard``)::

    optuna-dashboard studies/<study>/journal.log          # the default journal storage
    optuna-dashboard sqlite:///path/to/db.sqlite3         # or the URL given to --storage
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optimizer.recipes.present import add_recipes
from optimizer.report.rows import (
    PARETO_COLUMNS,
    TRIAL_COLUMNS,
    configurations,
    pareto_rows,
    scrub,
    to_csv,
    trial_rows,
)
from optimizer.report.text import compare_formats, recommendation

__all__ = ["PARETO_COLUMNS", "TRIAL_COLUMNS", "ReportFiles", "compare_formats", "recommendation", "scrub", "write_reports"]


PLOTS_HINT = "pip install 'exl2opt[plots]'"


@dataclass(frozen=True)
class ReportFiles:
    """Paths written by :func:`write_reports` (plots None when they were not drawn)."""

    pareto_csv: Path
    trials_csv: Path
    png: Path | None
    html: Path | None
    comparison: str = ""
    skipped: str = ""  # one line saying what was not drawn and why (matplotlib absent), else empty

    @property
    def written(self) -> tuple[Path, ...]:
        """Every file written, in the order above."""
        return tuple(p for p in (self.pareto_csv, self.trials_csv, self.png, self.html) if p is not None)


def write_reports(*, study: Any, out_dir: Path, plots: bool = True) -> tuple[ReportFiles, list[dict[str, Any]]]:
    """Write the CSVs, pareto.png and report.html for ``study`` into ``out_dir`` (``plots=False``:
    the CSVs only); returns the files and the Pareto rows."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = trial_rows(study)
    variants = study.user_attrs.get("variants", {}) or {}
    front = add_recipes(pareto_rows(rows, variants), spec_record=study.user_attrs.get("spec"))
    pareto_csv, trials_csv = out_dir / "pareto.csv", out_dir / "trials.csv"
    pareto_csv.write_text(to_csv(front, PARETO_COLUMNS))
    trials_csv.write_text(to_csv(rows, TRIAL_COLUMNS))
    png = html = None
    skipped = ""
    if plots:
        from optimizer.report.page import write_page
        from optimizer.report.png import write_png

        try:
            png = write_png(rows, front, out_dir / "pareto.png")
        except ModuleNotFoundError as e:  # matplotlib is the `plots` extra, not in the base install
            if e.name is None or e.name.split(".")[0] != "matplotlib":
                raise
            skipped = f"pareto.png not drawn: matplotlib is not installed ({PLOTS_HINT})"
        html = write_page(study=study, configs=configurations(rows), front=front, all_rows=rows, path=out_dir / "report.html")
    files = ReportFiles(pareto_csv=pareto_csv, trials_csv=trials_csv, png=png, html=html,
                        comparison=compare_formats(rows, front), skipped=skipped)
    return files, front
