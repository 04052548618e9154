"""The one option table of ``exl2opt search`` and ``exl2opt worker``.

Every option the two commands share is defined once, as a field of :class:`StudyArgs` (its type,
its default and its typer option); each command adds only its own few (:class:`SearchArgs`,
:class:`WorkerArgs`). :func:`study_command` builds a typer command from those tables, so the two
commands cannot drift apart: an option added here exists in both, with the same name and meaning.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, TypeVar, get_type_hints

import typer

from optimizer.cli import _common as c
from optimizer.cli import _predict as pr
from optimizer.errors import BadOptionError

if TYPE_CHECKING:  # imported where used, not at start-up (``--help``)
    from optimizer.study import SearchSpec


def _opt(option: Any) -> Any:
    """A dataclass field whose default is the typer option's, with the option kept as metadata."""
    return field(default=option.default, metadata={"option": option})


@dataclass(frozen=True)
class StudyArgs:
    """Options shared by ``search`` and ``worker``: the search space, the protocols, the study."""

    model: Optional[list[str]] = _opt(typer.Option(
        None, "--model", "-m", metavar="SRC", help="Local dir, dir of variant dirs, or Hub repo (org/name[@revision]). Repeatable. "
        "Needed to create a study; a worker joining an existing study reads them from it."))
    vram: Optional[str] = _opt(typer.Option(
        None, "--vram", metavar="SIZE", help="VRAM per GPU: 15GB (10^9 B), 15GiB (2^30 B), 15000MiB, or a per-GPU list 24GB,24GB "
        "(with --model)."))
    gpus: Optional[int] = _opt(c.GpusOpt)
    gpu_split: Optional[str] = _opt(c.GpuSplitOpt)
    ctx: str = _opt(c.CtxOpt)
    cache: Optional[str] = _opt(c.CacheOpt)
    min_ctx: int = _opt(typer.Option(
        2048, "--min-ctx", callback=c.in_range("--min-ctx", 0, 1 << 26),
        help="Floor on context length (tokens); smaller configurations are not searched."))
    overhead: Optional[str] = _opt(c.OverheadOpt)
    margin: Optional[str] = _opt(c.MarginOpt)
    reserve: Optional[str] = _opt(c.ReserveOpt)
    chunk: int = _opt(c.ChunkOpt)
    batch: int = _opt(c.BatchOpt)
    flash_attn: bool = _opt(c.FlashOpt)
    offline: bool = _opt(c.OfflineOpt)
    n_gpu_layers: Optional[int] = _opt(c.NGpuLayersOpt)
    fmt: Optional[str] = _opt(c.FormatOpt)
    eval_data: Optional[Path] = _opt(typer.Option(
        None, "--eval-data", help="Local .txt or .parquet evaluation text (default: wikitext-2-raw-v1 test via "
        "datasets; needs network once). Every worker of a study must use the same text."))
    eval_windows: int = _opt(typer.Option(20, "--eval-windows", callback=c.in_range("--eval-windows", 1, 100000),
                                          help="Perplexity windows (each --eval-window tokens)."))
    eval_window: int = _opt(typer.Option(
        2048, "--eval-window", callback=c.in_range("--eval-window", 64, 1 << 20),
        help="Perplexity window in tokens (first half prefilled into the cache)."))
    fill: int = _opt(typer.Option(2048, "--speed-fill", callback=c.in_range("--speed-fill", 0, 1 << 26),
        help="Tokens in the cache when generation speed is measured."))
    backend: str = _opt(typer.Option("auto", "--backend",
                                     help="exllamav2 | exllamav3 | llamacpp | auto (by variant format)."))
    n_trials: Optional[int] = _opt(typer.Option(
        None, "--n-trials", callback=c.in_range("--n-trials", 1, 10**9),
        help="Measurements to run now, by this process (default: until nothing is left)."))
    timeout: Optional[float] = _opt(typer.Option(
        None, "--timeout", help="Stop starting new measurements after this many seconds."))
    study: Optional[str] = _opt(typer.Option(
        None, "--study", help="Study name (default: <model>-<vram>). The same name resumes or joins the study."))
    storage: Optional[str] = _opt(typer.Option(
        None, "--storage", envvar="EXL2OPT_STORAGE",
        help="Optuna storage URL (sqlite:///x.db, postgresql+psycopg://user:pw@host/db), also read from "
             "EXL2OPT_STORAGE. Default: the journal file <studies-dir>/<study>/journal.log (one machine)."))
    root: Path = _opt(typer.Option(
        Path("studies"), "--studies-dir", "--root", help="Directory holding study folders and reports."))
    backend_factory: Optional[str] = _opt(typer.Option(None, "--backend-factory", hidden=True))
    exhaustive: bool = _opt(typer.Option(
        False, "--exhaustive", help="Measure every feasible configuration (default: only those that can reach the "
        "front; the others are stored as skipped, with predictions and the reason)."))
    gpu: Optional[str] = _opt(pr.GpuOpt)

    def check(self) -> None:
        """Ranges the options must respect (one clear line each)."""
        if self.n_trials is not None and self.n_trials < 1:
            raise BadOptionError("--n-trials must be at least 1")
        if self.timeout is not None and self.timeout <= 0:
            raise BadOptionError("--timeout must be a positive number of seconds")
        if self.model and self.vram is None:
            raise BadOptionError("--model needs --vram")
        if self.vram is not None and not self.model:
            raise BadOptionError("--vram needs --model")

    def study_name(self) -> str | None:
        """``--study``, or ``<model>-<vram>`` when the model options are given."""
        if self.study:
            return self.study
        if self.model and self.vram:
            return default_study_name(model=self.model, vram=self.vram)
        return None


@dataclass(frozen=True)
class SearchArgs:
    """Options of ``search`` only."""

    sampler: str = _opt(typer.Option(
        "auto", "--sampler", help="auto | tpe | bruteforce | gp. auto enumerates the feasible set in load order "
        "when it fits --n-trials, else TPE. A forced sampler measures every feasible configuration (as --exhaustive)."))
    seed: int = _opt(typer.Option(0, "--seed", callback=c.in_range("--seed", 0, 2**32 - 1), help="Sampler seed."))
    no_report: bool = _opt(typer.Option(False, "--no-report", help="Do not write reports at the end."))
    predict_only: bool = _opt(typer.Option(
        False, "--predict-only", help="No GPU, no download: write trials.csv, pareto.csv and a plot of the "
        "predicted front (source=predicted, with intervals) and stop."))


@dataclass(frozen=True)
class WorkerArgs:
    """Options of ``worker`` only: fault handling with other workers."""

    heartbeat: int = _opt(typer.Option(10, "--heartbeat", callback=c.in_range("--heartbeat", 1, 86400),
        help="Seconds between heartbeats (database storages)."))
    grace: Optional[int] = _opt(typer.Option(
        None, "--grace", callback=c.in_range("--grace", 1, 10**6),
        help="Seconds without heartbeat before a trial is failed and retried elsewhere "
        "(default 3 x --heartbeat)."))
    max_retry: int = _opt(typer.Option(1, "--max-retry", callback=c.in_range("--max-retry", 0, 1000),
        help="Re-runs of a trial whose worker died."))
    poll: float = _opt(typer.Option(2.0, "--poll", help="Seconds between checks while other workers finish."))


Own = TypeVar("Own")


def study_command(app: typer.Typer, *, name: str,
                  own: type[Own]) -> Callable[[Callable[[StudyArgs, Own], None]], Callable[..., None]]:
    """Register ``body(shared, own)`` on ``app`` as the command ``name`` with the options of
    :class:`StudyArgs` and of ``own`` (a dataclass like :class:`SearchArgs`). The body's docstring is
    the command's help."""
    tables: tuple[type[Any], ...] = (StudyArgs, own)

    def register(body: Callable[[StudyArgs, Own], None]) -> Callable[..., None]:
        params = []
        for table in tables:
            hints = get_type_hints(table)
            params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.metadata["option"],
                                         annotation=hints[f.name]) for f in fields(table)]

        def command(**values: Any) -> None:
            shared = StudyArgs(**{f.name: values[f.name] for f in fields(StudyArgs)})
            body(shared, own(**{f.name: values[f.name] for f in fields(own)}))  # type: ignore[arg-type]

        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        command.__doc__ = body.__doc__
        command.__name__ = command.__qualname__ = name
        command.__module__ = body.__module__
        app.command(name=name)(command)
        return command

    return register


def default_study_name(*, model: list[str], vram: str) -> str:
    """``<last part of the first model>-<vram>``, made safe for a folder name."""
    import re

    base = model[0].rstrip("/").split("/")[-1].split("@")[0] or "study"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{base}-{vram}")[:100]


def default_factory(backend: str) -> Any:
    """The backend factory: ``backend`` is exllamav2 | exllamav3 | llamacpp | auto (by format)."""
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


def spec_from_args(args: StudyArgs) -> SearchSpec:
    """The SearchSpec of the model options (same options, same fingerprint, in both commands).

    Raises:
        BadOptionError: an option is out of range; also the source and size errors of the options.
    """
    from optimizer.backends.base import EvalProtocol, SpeedProtocol
    from optimizer.evaldata import dataset_id_for
    from optimizer.formats import RuntimeOptions
    from optimizer.sources import resolve_sources
    from optimizer.space import check_caches
    from optimizer.study import SearchSpec

    if not args.model or args.vram is None:
        raise BadOptionError("give --model and --vram")
    if args.eval_window < 64 or args.eval_windows < 1:
        raise BadOptionError("--eval-window must be >= 64 tokens and --eval-windows >= 1")
    if args.eval_data is not None and not args.eval_data.is_file():
        raise BadOptionError(f"--eval-data {args.eval_data}: " + ("not a file" if args.eval_data.exists() else "no such file"))
    if args.eval_data is not None:  # read now: an empty or unreadable file must not become part of a new study
        from optimizer.evaldata import load_eval_text

        load_eval_text(path=args.eval_data)
    budget = c.budget_from(vram=args.vram, overhead=args.overhead, margin=args.margin)
    split = c.split_from(gpus=args.gpus, gpu_split=args.gpu_split, budget=budget, reserve=args.reserve)
    contexts = c.parse_contexts(args.ctx)
    caches = c.parse_caches(args.cache)
    variants = c.filter_formats(resolve_sources(specs=list(args.model), hub=c.hub_options(offline=args.offline)),
                                args.fmt)
    if caches:
        caches = check_caches(variants, caches)
    return SearchSpec(variants=tuple(variants), budget=budget, split=split, contexts=contexts, caches=caches,
                      min_ctx=args.min_ctx,
                      runtime=RuntimeOptions(batch_size=args.batch, chunk_len=args.chunk, flash_attn=args.flash_attn,
                                             n_gpu_layers=args.n_gpu_layers),
                      eval_protocol=EvalProtocol(dataset=dataset_id_for(args.eval_data), window=args.eval_window,
                                                 n_windows=args.eval_windows, prefill=args.eval_window // 2,
                                                 score_chunk=min(256, args.eval_window // 4)),
                      speed_protocol=SpeedProtocol(context_fill=args.fill))


def study_spec(args: StudyArgs, *, name: str) -> SearchSpec:
    """The spec of the model options, or (without ``--model``) the one kept in study ``name``.

    Raises:
        BadOptionError: ``--eval-data`` names other text than the study measures perplexity on.
        StudyError: no ``--model`` and no such study.
    """
    from optimizer.evaldata import dataset_id_for
    from optimizer.study import stored_spec

    if args.model:
        return spec_from_args(args)
    spec = stored_spec(study_name=name, storage_url=args.storage, root=args.root)
    if dataset_id_for(args.eval_data) != spec.eval_protocol.dataset:
        raise BadOptionError(f"study {name!r} measures perplexity on {spec.eval_protocol.dataset}; give the same "
                             "--eval-data it was created with")
    return spec


def backend_factory_for(args: StudyArgs, spec: SearchSpec) -> Any:
    """The backend factory; each backend the spec needs is checked first (one clear line, no study touched)."""
    from optimizer.backends import backend_for, backend_name_for

    if args.backend_factory:
        return load_factory(args.backend_factory)
    for bname in sorted({backend_name_for(variant=v, name=args.backend) for v in spec.variants}):
        backend_for(variant=next(v for v in spec.variants if backend_name_for(variant=v, name=args.backend) == bname),
                    name=bname).check_available()
    return default_factory(args.backend)


def carried(args: StudyArgs) -> list[str]:
    """The options a printed resume / join command must repeat (the rest is kept in the study)."""
    out: list[str] = []
    if args.eval_data is not None:
        out += ["--eval-data", str(args.eval_data)]
    if args.backend != "auto":
        out += ["--backend", args.backend]
    if args.backend_factory:
        out += ["--backend-factory", args.backend_factory]
    if args.offline:
        out.append("--offline")
    if args.exhaustive:
        out.append("--exhaustive")
    if args.gpu:
        out += ["--gpu", args.gpu]
    return out
