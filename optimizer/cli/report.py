"""``exl2opt report STUDY``: rebuild the reports of a study from its storage alone."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from optimizer.cli import app


@app.command()
def report(
    study: str = typer.Argument(..., metavar="STUDY", help="Study name (a folder under --studies-dir for the default journal storage)."),
    storage: Optional[str] = typer.Option(None, "--storage", help="Optuna storage URL (default: studies/<study>/journal.log)."),
    root: Path = typer.Option(Path("studies"), "--studies-dir", "--root", help="Directory holding study folders."),
    out: Optional[Path] = typer.Option(None, "--out", help="Where to write the reports (default: studies/<study>/)."),
    no_plots: bool = typer.Option(False, "--no-plots", help="Write only the CSV files."),
    open_page: bool = typer.Option(False, "--open", help="Open report.html in the default web browser."),
) -> None:
    """Write pareto.csv, trials.csv, pareto.png and report.html, and print a recommendation.

    report.html is one self-contained page (works offline): the front with hover details and download
    commands, the recommendation, the measurement protocol and its noise, every configuration with its
    status and reason, and VRAM bars (predicted by term beside measured).

    pareto.csv: one row per Pareto-optimal configuration (perplexity down, generation tokens/s up,
    context up) with predicted and measured VRAM per GPU (GiB, ';'-separated) and the download
    command. trials.csv: every trial, including configurations rejected by the VRAM model and
    failed ones, with the reason.

    To browse the study interactively: pip install optuna-dashboard, then
    optuna-dashboard studies/<study>/journal.log (or the --storage URL).
    """
    from rich.console import Console

    from optimizer.errors import StudyError
    from optimizer.report import recommendation, write_reports
    from optimizer.storage import JOURNAL_NAME, study_dir
    from optimizer.study import open_study
    from optimizer.textsafe import plain

    d = study_dir(study=study, root=root)
    if storage is None and not (d / JOURNAL_NAME).is_file():
        raise StudyError(f"no study {study!r} under {root} (no {d / JOURNAL_NAME}); give --studies-dir or --storage")
    st = open_study(study_name=study, storage_url=storage, root=root, create=False)
    files, front = write_reports(study=st, out_dir=out or d, plots=not no_plots)
    con = Console()
    for line in [*recommendation(front).splitlines(), *files.comparison.splitlines()]:  # one line each: safe()
        con.print(plain(line), soft_wrap=True)                                           # escapes newlines
    con.print(plain("Reports: " + ", ".join(str(f) for f in files.written)))
    if files.skipped:
        con.print(plain(files.skipped))
    if open_page:
        from optimizer.errors import BadOptionError

        if files.html is None:
            raise BadOptionError("--open needs the page: drop --no-plots")
        con.print(plain(open_in_browser(files.html)), soft_wrap=True)


def open_in_browser(page: Path) -> str:
    """Open ``page`` in the default browser; the line to print (what happened, or what to do instead)."""
    import webbrowser

    uri = page.resolve().as_uri()
    try:
        opened = webbrowser.open(uri)
    except webbrowser.Error:
        opened = False
    return f"Opened {uri}" if opened else f"No web browser could be started here; open {uri} in one."
