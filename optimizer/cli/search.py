"""``exl2opt search``: measure the feasible configurations and write the Pareto front.

Short form: ``exl2opt search --model turboderp/Llama-3-8B-exl2 --vram 15GB``. The study lives in
``studies/<study>/`` (an Optuna journal); rerunning the same command resumes it (finished trials
are kept, a Ctrl-C'd or killed trial is retried). Reports are written there at the end; see
``exl2opt report --help`` for the files and how to open the study in optuna-dashboard.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import typer

from optimizer.cli import _common as c
from optimizer.cli import _predict as pr
from optimizer.cli import app
from optimizer.errors import BadOptionError
from optimizer.textsafe import plain


def _default_study(model: list[str], vram: str) -> str:
    base = model[0].rstrip("/").split("/")[-1].split("@")[0] or "study"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{base}-{vram}")[:100]


@app.command()
def search(
    model: list[str] = c.ModelOpt,
    vram: str = c.VramOpt,
    gpus: Optional[int] = c.GpusOpt,
    gpu_split: Optional[str] = c.GpuSplitOpt,
    ctx: str = c.CtxOpt,
    cache: Optional[str] = c.CacheOpt,
    overhead: Optional[str] = c.OverheadOpt,
    chunk: int = c.ChunkOpt,
    batch: int = c.BatchOpt,
    flash_attn: bool = c.FlashOpt,
    offline: bool = c.OfflineOpt,
    n_gpu_layers: Optional[int] = c.NGpuLayersOpt,
    min_ctx: int = typer.Option(2048, "--min-ctx",
        callback=c.in_range("--min-ctx", 0, 1 << 26),
        help="Floor on context length (tokens); smaller configurations are not searched."),
    n_trials: Optional[int] = typer.Option(None, "--n-trials",
        callback=c.in_range("--n-trials", 1, 10**9),
        help="GPU trials to run now (default: until the space is exhausted)."),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="Stop starting new trials after this many seconds."),
    study: Optional[str] = typer.Option(None, "--study", help="Study name (default: <model>-<vram>). Same name = resume."),
    storage: Optional[str] = typer.Option(None, "--storage", help="Optuna storage URL (sqlite:///x.db, postgresql+psycopg://...). "
                                          "Default: journal file studies/<study>/journal.log."),
    root: Path = typer.Option(Path("studies"), "--studies-dir", "--root", help="Directory holding study folders and reports."),
    eval_data: Optional[Path] = typer.Option(None, "--eval-data", help="Local .txt or .parquet evaluation text "
                                             "(default: wikitext-2-raw-v1 test via datasets; needs network once)."),
    eval_windows: int = typer.Option(20, "--eval-windows",
        callback=c.in_range("--eval-windows", 1, 100000),
        help="Perplexity windows (each --eval-window tokens)."),
    eval_window: int = typer.Option(2048, "--eval-window",
        callback=c.in_range("--eval-window", 64, 1 << 20),
        help="Perplexity window in tokens (first half prefilled into the cache)."),
    fill: int = typer.Option(2048, "--speed-fill",
        callback=c.in_range("--speed-fill", 0, 1 << 26),
        help="Tokens in the cache when generation speed is measured."),
    sampler: str = typer.Option("auto", "--sampler", help="auto | tpe | bruteforce | gp. auto enumerates the feasible set "
                                "in load order when it fits --n-trials, else TPE."),
    backend: str = typer.Option("auto", "--backend", help="exllamav2 | llamacpp | auto (by variant format)."),
    seed: int = typer.Option(0, "--seed",
        callback=c.in_range("--seed", 0, 2**32 - 1),
        help="Sampler seed."),
    no_report: bool = typer.Option(False, "--no-report", help="Do not write reports at the end."),
    exhaustive: bool = typer.Option(False, "--exhaustive", help="Measure every feasible configuration (default: only "
                                    "those that can reach the front; the others are stored as skipped, with predictions)."),
    predict_only: bool = typer.Option(False, "--predict-only", help="No GPU, no download: write trials.csv, pareto.csv and "
                                      "a plot of the predicted front (source=predicted, with intervals) and stop."),
    gpu: Optional[str] = pr.GpuOpt,
    backend_factory: Optional[str] = typer.Option(None, "--backend-factory", hidden=True),
) -> None:
    """Measure perplexity and tokens/s of every configuration that fits the VRAM budget; write the Pareto front.

    Configurations the VRAM model rejects are never loaded: they are recorded with their predicted
    breakdown and reason. Objectives: perplexity (down), generation tokens/s (up), context length (up).
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from optimizer.backends import backend_for, backend_name_for
    from optimizer.cli.worker import default_factory, load_factory, spec_from_options
    from optimizer.evaldata import load_eval_text
    from optimizer.storage import study_dir
    from optimizer.study import SAMPLERS, open_study, run

    if sampler not in SAMPLERS:
        raise BadOptionError(f"unknown --sampler {sampler!r} (choose from {', '.join(SAMPLERS)})")
    if n_trials is not None and n_trials < 1:
        raise BadOptionError("--n-trials must be at least 1")
    if timeout is not None and timeout <= 0:
        raise BadOptionError("--timeout must be a positive number of seconds")
    spec = spec_from_options(model=model, vram=vram, gpus=gpus, gpu_split=gpu_split, ctx=ctx, cache=cache,
                             min_ctx=min_ctx, overhead=overhead, chunk=chunk, batch=batch, flash_attn=flash_attn,
                             offline=offline, eval_data=eval_data, eval_windows=eval_windows,
                             eval_window=eval_window, fill=fill, n_gpu_layers=n_gpu_layers)
    name = study or _default_study(model, vram)
    gpu_names = pr.resolve_gpus(gpu)
    if predict_only:
        pr.write_predicted_front(spec=spec, out_dir=study_dir(study=name, root=root), gpus=gpu_names)
        return
    if backend_factory:
        factory = load_factory(backend_factory)
    else:
        variants = spec.variants
        for bname in sorted({backend_name_for(variant=v, name=backend) for v in variants}):
            backend_for(variant=next(v for v in variants if backend_name_for(variant=v, name=backend) == bname),
                        name=bname).check_available()  # one clear line before any study is created
        factory = default_factory(backend)
    con = Console(stderr=True)
    with Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=con, transient=False) as prog:
        res = run(spec=spec, study_name=name, backend_factory=factory,
                  eval_text=lambda: load_eval_text(path=eval_data), storage_url=storage, root=root,
                  n_trials=n_trials, timeout=timeout, sampler=sampler, seed=seed, progress=prog,
                  exhaustive=exhaustive or sampler != "auto", gpus=gpu_names)
    out = Console()
    out.print(plain(f"Study {name}: {res.n_feasible} feasible / {res.n_infeasible} rejected by the VRAM model; "
              f"measured {res.n_measured}, skipped {res.n_skipped} (dominated), failed {res.n_failed}, "
              f"reused {res.n_reused}, model loads {res.model_loads}; "
              f"stopped: {res.stop_reason}."))
    if res.n_feasible == 0:
        out.print("The VRAM model rejects every configuration of this study, so nothing was measured; "
                  "see trials.csv for each one's predicted excess and reason, and try a larger --vram, "
                  "smaller --ctx, quantized --cache modes or a smaller --min-ctx.", soft_wrap=True)
    if no_report:
        return
    from optimizer.report import recommendation, write_reports

    st = open_study(study_name=name, storage_url=storage, root=root, create=False)
    files, front = write_reports(study=st, out_dir=study_dir(study=name, root=root))
    out.print(plain(recommendation(front)), soft_wrap=True)
    if files.comparison:
        out.print(plain(files.comparison), soft_wrap=True)
    out.print(plain("Reports: " + ", ".join(str(f) for f in files.written)))
