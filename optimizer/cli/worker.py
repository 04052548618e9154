"""``exl2opt worker``: join a study from any process or machine and measure until nothing is left.

Run one worker per GPU (``CUDA_VISIBLE_DEVICES=i exl2opt worker --study S --storage URL``); every
configuration is measured by exactly one worker (see :mod:`optimizer.study.worker_loop`). The first
worker (or ``exl2opt search``) needs the model options; later workers read them from the study.
"""

from __future__ import annotations

import importlib
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any, Optional

import typer

from optimizer.cli import _common as c
from optimizer.cli import app
from optimizer.errors import BadOptionError
from optimizer.textsafe import safe, shell_join


def default_factory(backend: str) -> Any:
    """The backend factory of ``exl2opt search``: ``backend`` is exllamav2 | llamacpp | auto (by format)."""
    from optimizer.backends import backend_for

    def factory(variant: Any) -> Any:
        return backend_for(variant=variant, name=backend)

    return factory


def load_factory(text: str) -> Any:
    """``module:attr`` -> the callable (a test hook: ``fake_engine:fake_backend_factory``)."""
    mod_name, _, attr = text.partition(":")
    if not mod_name or not attr:
        raise BadOptionError(f"invalid --backend-factory {text!r}: expected module:attribute")
    try:
        return getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise BadOptionError(f"invalid --backend-factory {text!r}: {e}") from None


def _sigterm_to_interrupt(_sig: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@app.command()
def worker(
    study: str = typer.Option(..., "--study", help="Study name (the same on every worker)."),
    storage: Optional[str] = typer.Option(
        None, "--storage", envvar="EXL2OPT_STORAGE",
        help="Optuna storage URL shared by all workers, e.g. postgresql+psycopg://user:pw@host/db. "
             "Default: the embedded journal studies/<study>/journal.log (one machine only)."),
    root: Path = typer.Option(Path("studies"), "--root", help="Directory of study directories."),
    model: Optional[list[str]] = typer.Option(None, "--model", "-m",
                                              help="Models (only to create the study; later workers read it)."),
    vram: Optional[str] = typer.Option(None, "--vram", help="VRAM per GPU (only with --model)."),
    gpus: Optional[int] = c.GpusOpt,
    gpu_split: Optional[str] = c.GpuSplitOpt,
    ctx: str = c.CtxOpt,
    cache: Optional[str] = c.CacheOpt,
    min_ctx: int = typer.Option(2048, "--min-ctx",
        callback=c.in_range("--min-ctx", 0, 1 << 26),
        help="Floor on context length (tokens), as search."),
    overhead: Optional[str] = c.OverheadOpt,
    chunk: int = c.ChunkOpt,
    batch: int = c.BatchOpt,
    flash_attn: bool = c.FlashOpt,
    offline: bool = c.OfflineOpt,
    eval_data: Optional[Path] = typer.Option(None, "--eval-data", help="Evaluation text (.txt/.parquet); default wikitext-2. "
                                             "Every worker must use the same text."),
    eval_windows: int = typer.Option(20, "--eval-windows",
        callback=c.in_range("--eval-windows", 1, 100000),
        help="Perplexity windows (only with --model; as search)."),
    eval_window: int = typer.Option(2048, "--eval-window",
        callback=c.in_range("--eval-window", 64, 1 << 20),
        help="Perplexity window in tokens (only with --model)."),
    fill: int = typer.Option(2048, "--speed-fill",
        callback=c.in_range("--speed-fill", 0, 1 << 26),
        help="Tokens in the cache for the speed test (only with --model)."),
    backend: str = typer.Option("auto", "--backend", help="exllamav2 | llamacpp | auto (by variant format)."),
    n_trials: Optional[int] = typer.Option(None, "--n-trials",
        callback=c.in_range("--n-trials", 1, 10**9),
        help="Stop after this many measurements by this worker."),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="Stop claiming new trials after this many seconds."),
    heartbeat: int = typer.Option(10, "--heartbeat",
        callback=c.in_range("--heartbeat", 1, 86400),
        help="Seconds between heartbeats (database storages)."),
    grace: Optional[int] = typer.Option(None, "--grace",
        callback=c.in_range("--grace", 1, 10**6),
        help="Seconds without heartbeat before a trial is failed and "
                                        "retried elsewhere (default 3 x --heartbeat)."),
    max_retry: int = typer.Option(1, "--max-retry",
        callback=c.in_range("--max-retry", 0, 1000),
        help="Re-runs of a trial whose worker died."),
    poll: float = typer.Option(2.0, "--poll", help="Seconds between checks while other workers finish."),
    backend_factory: Optional[str] = typer.Option(None, "--backend-factory", hidden=True),
) -> None:
    """Join a study (create it with --model) and measure configurations until none is left."""
    from optimizer.evaldata import load_eval_text
    from optimizer.study import WorkerOptions, run_worker
    from optimizer.study.liveness import worker_id

    if heartbeat < 1 or (grace is not None and grace <= heartbeat) or max_retry < 0 or poll <= 0:
        raise BadOptionError("need --heartbeat >= 1, --grace > --heartbeat, --max-retry >= 0, --poll > 0")
    if n_trials is not None and n_trials < 1:
        raise BadOptionError("--n-trials must be at least 1")
    if timeout is not None and timeout <= 0:
        raise BadOptionError("--timeout must be a positive number of seconds")
    options = WorkerOptions(heartbeat_interval=heartbeat, grace_period=grace, max_retry=max_retry, poll_s=poll)
    if model:
        if vram is None:
            raise BadOptionError("--model needs --vram")
        spec = spec_from_options(model=model, vram=vram, gpus=gpus, gpu_split=gpu_split, ctx=ctx, cache=cache,
                                  min_ctx=min_ctx, overhead=overhead, chunk=chunk, batch=batch,
                                  flash_attn=flash_attn, offline=offline, eval_data=eval_data,
                                  eval_windows=eval_windows, eval_window=eval_window, fill=fill)
    else:
        spec = None  # read from the study by run_worker
    factory = load_factory(backend_factory) if backend_factory else default_factory(backend)
    me = worker_id()

    def log(msg: str) -> None:
        print(safe(f"[{me}] {msg}"), file=sys.stderr, flush=True)

    old = signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
    try:
        res = run_worker(spec=spec, study_name=study, backend_factory=factory,
                         eval_text=lambda: load_eval_text(path=eval_data), storage_url=storage, root=root,
                         n_trials=n_trials, timeout=timeout, options=options, log=log)
    finally:
        signal.signal(signal.SIGTERM, old)
    print(safe(f"worker {me}: measured {res.n_measured} configuration(s) here; study {study!r}: "
               f"{res.n_feasible} feasible, {res.n_failed} failed, stop: {res.stop_reason}"))
    where = ["--storage", _safe(storage)] if storage else []
    where += ["--studies-dir", str(root)] if root != Path("studies") else []
    print(safe("Report: " + shell_join(["exl2opt", "report", study, *where])))


def _safe(url: str | None) -> str:
    from optimizer.storage import safe_url

    return safe_url(url) if url else ""


def spec_from_options(*, model: list[str], vram: str, gpus: Optional[int], gpu_split: Optional[str], ctx: str,
                      cache: Optional[str], min_ctx: int, overhead: Optional[str], chunk: int, batch: int,
                      flash_attn: bool, offline: bool, eval_data: Optional[Path], eval_windows: int,
                      eval_window: int, fill: int, n_gpu_layers: Optional[int] = None) -> Any:
    """The SearchSpec of the model options shared by ``exl2opt search`` and ``exl2opt worker``
    (same options, same fingerprint)."""
    from optimizer.backends.base import EvalProtocol, SpeedProtocol
    from optimizer.evaldata import dataset_id_for
    from optimizer.formats import RuntimeOptions
    from optimizer.sources import resolve_sources
    from optimizer.space import check_caches
    from optimizer.study import SearchSpec

    if eval_window < 64 or eval_windows < 1:
        raise BadOptionError("--eval-window must be >= 64 tokens and --eval-windows >= 1")
    if eval_data is not None and not eval_data.is_file():
        raise BadOptionError(f"--eval-data {eval_data}: no such file")
    budget = c.budget_from(vram=vram, overhead=overhead)
    split = c.split_from(gpus=gpus, gpu_split=gpu_split, budget=budget)
    contexts = c.parse_contexts(ctx)
    caches = c.parse_caches(cache)
    variants = resolve_sources(specs=model, hub=c.hub_options(offline=offline))
    if caches:
        caches = check_caches(variants, caches)
    return SearchSpec(variants=tuple(variants), budget=budget, split=split, contexts=contexts, caches=caches,
                      min_ctx=min_ctx, runtime=RuntimeOptions(batch_size=batch, chunk_len=chunk, flash_attn=flash_attn,
                                             n_gpu_layers=n_gpu_layers),
                      eval_protocol=EvalProtocol(dataset=dataset_id_for(eval_data), window=eval_window,
                                                 n_windows=eval_windows, prefill=eval_window // 2,
                                                 score_chunk=min(256, eval_window // 4)),
                      speed_protocol=SpeedProtocol(context_fill=fill))
