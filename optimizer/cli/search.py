"""``exl2opt search``: measure the feasible configurations and write the Pareto front.

Short form: ``exl2opt search --model turboderp/Llama-3-8B-exl2 --vram 15GB``. The study lives in
``studies/<study>/`` (an Optuna journal); rerunning the same command, or ``exl2opt search --study S``,
resumes it (finished trials are kept, a Ctrl-C'd or killed trial is retried). Reports are written
there at the end; see ``exl2opt report --help`` for the files and how to open the study in
optuna-dashboard. The options are those of ``exl2opt worker`` (one table, optimizer.cli._study_options).
"""

from __future__ import annotations

from optimizer.cli import app
from optimizer.cli._study_options import SearchArgs, StudyArgs, study_command
from optimizer.errors import BadOptionError


@study_command(app, name="search", own=SearchArgs)
def search(args: StudyArgs, own: SearchArgs) -> None:
    """Measure perplexity and tokens/s of every configuration that fits the VRAM budget; write the Pareto front.

    Configurations the VRAM model rejects are never loaded: they are recorded with their predicted
    breakdown and reason. Objectives: perplexity (down), generation tokens/s (up), context length (up).
    Without --model, --study resumes a study that was created with the model options.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from optimizer.cli import _predict as pr
    from optimizer.cli._study_options import backend_factory_for, carried, study_spec
    from optimizer.errors import RunInterrupted, StudyBusyError
    from optimizer.evaldata import load_eval_text
    from optimizer.storage import study_dir
    from optimizer.study import SAMPLERS, ending, interrupted, run
    from optimizer.study.commands import study_command as printed
    from optimizer.textsafe import safe

    args.check()
    if own.sampler not in SAMPLERS:
        raise BadOptionError(f"unknown --sampler {own.sampler!r} (choose from {', '.join(SAMPLERS)})")
    name = args.study_name()
    if name is None:
        raise BadOptionError("give --model and --vram (or --study NAME to resume a study)")
    study_dir(study=name, root=args.root)  # an invalid --study name: one line before the progress bar starts
    spec = study_spec(args, name=name)
    gpu_names = pr.resolve_gpus(args.gpu)
    if own.predict_only:
        pr.write_predicted_front(spec=spec, out_dir=study_dir(study=name, root=args.root), gpus=gpu_names)
        return
    factory = backend_factory_for(args, spec)
    # which overhead a stored calibration or the default gave (an explicit --overhead is not echoed);
    # on stdout, so that a refused run stays one line on stderr
    if spec.budget.overhead_note and not spec.budget.overhead_note.endswith("(--overhead)"):
        from optimizer.calibration import overhead_line

        print(safe(overhead_line(overhead=spec.budget.overhead, note=spec.budget.overhead_note,
                                 formats=[v.format for v in spec.variants])))
    extra = carried(args) + (["--sampler", own.sampler] if own.sampler != "auto" else []) + \
        (["--seed", str(own.seed)] if own.seed != 0 else [])
    resume = printed("search", study=name, root=args.root, storage_url=args.storage, extra=extra)
    report_cmd = printed("report", study=name, root=args.root, storage_url=args.storage)
    try:
        with _progress(Progress)(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=Console(stderr=True), transient=False) as prog:
            res = run(spec=spec, study_name=name, backend_factory=factory,
                      eval_text=lambda: load_eval_text(path=args.eval_data), storage_url=args.storage, root=args.root,
                      n_trials=args.n_trials, timeout=args.timeout, sampler=own.sampler, seed=own.seed, progress=prog,
                      exhaustive=args.exhaustive or own.sampler != "auto", gpus=gpu_names)
    except KeyboardInterrupt:
        raise RunInterrupted(interrupted(resume=resume)) from None
    except StudyBusyError as e:
        join = printed("worker", study=name, root=args.root, storage_url=args.storage, extra=carried(args))
        raise StudyBusyError(f"{e}; if workers run it, add one more with `{join}`") from None
    print(safe(f"Study {name}: {res.n_feasible} feasible / {res.n_infeasible} rejected by the VRAM model; "
               f"measured {res.n_measured}, skipped {res.n_skipped} (dominated), failed {res.n_failed}, "
               f"reused {res.n_reused}, model loads "
               f"{res.model_loads}; stopped: {res.stop_reason}."))
    for line in ending(res, resume=resume, report=report_cmd):
        print(safe(line))
    if own.no_report:
        return
    _write_reports(args, name=name, recommend=res.study.measured > 0)


def _write_reports(args: StudyArgs, *, name: str, recommend: bool) -> None:
    """Write the study's reports; the recommendation only when something was measured."""
    from optimizer.report import recommendation, write_reports
    from optimizer.storage import study_dir
    from optimizer.study import open_study
    from optimizer.textsafe import safe

    st = open_study(study_name=name, storage_url=args.storage, root=args.root, create=False)
    files, front = write_reports(study=st, out_dir=study_dir(study=name, root=args.root))
    if recommend:
        for line in [*recommendation(front).splitlines(), *files.comparison.splitlines()]:
            print(safe(line))  # line by line: safe() escapes a newline
    print(safe("Reports: " + ", ".join(str(f) for f in files.written)))
    if files.skipped:
        print(safe(files.skipped))


def _progress(base: type) -> type:
    """rich's Progress, less the blank line it prints when it stops on a non-terminal with no task
    (an error before the first measurement is then one line on stderr)."""

    class _Quiet(base):  # type: ignore[valid-type,misc]
        def stop(self) -> None:
            if self.tasks:
                super().stop()
            elif not self.disable:
                self.live.stop()

    return _Quiet
