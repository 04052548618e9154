"""The configuration space: variants x context lengths x cache modes x split, and what fits.

This is the one place that decides the default context grid and cache modes; the CLI, the
planner and the study all ask it. Everything here is pure and cheap (no engine, no network).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

from optimizer.errors import BadOptionError
from optimizer.formats import RuntimeOptions, default_cache_modes, rules_for
from optimizer.variant import Variant
from optimizer.vram import GIB, MIB, Split, VramVerdict, place, split_budgets, unplaced, with_margin

#: Smallest context the automatic grid offers (tokens).
MIN_AUTO_CONTEXT = 2048


@dataclass(frozen=True)
class Budget:
    """Usable bytes per GPU, the per-GPU overhead to charge (CUDA context etc.) and a safety margin.

    ``per_device`` has one entry per GPU, or a single entry applied to every GPU; so do the others.
    ``overhead`` None means "the format's documented default". ``margin`` (bytes kept free on every
    used GPU) None means :func:`default_margin`.
    """

    per_device: tuple[int, ...]
    overhead: tuple[int, ...] | None = None
    margin: tuple[int, ...] | None = None
    overhead_note: str = field(default="", compare=False)  #: which overhead figure this is (printed)


#: The highest per-GPU memory beyond what the VRAM model counts in published nvidia-smi-level
#: readings (0.9 to 1.5 GiB, issue 10 / docs/margin.md). An overhead that was not measured may be
#: short by up to this much minus the overhead assumed.
OVERHEAD_HIGH_BYTES = 1536 * MIB
#: The smallest default margin for an assumed (unmeasured) overhead: the minimum reserve ExLlamaV2's
#: own autosplit holds back while loading.
MIN_MARGIN_BYTES = 256 * MIB


def default_margin(*, fmt: str, budget: Budget) -> tuple[int, ...]:
    """The safety margin per GPU (bytes), chosen from how uncertain the overhead is.

    ``budget.margin`` when given. Else, with the format's assumed overhead, the gap between it and
    ``OVERHEAD_HIGH_BYTES`` (at least ``MIN_MARGIN_BYTES``); with a given overhead (``--overhead``,
    or a calibrated figure) none: that overhead is a measurement, and ``--margin`` adds one.
    """
    if budget.margin is not None:
        return budget.margin
    if budget.overhead is not None:
        return (0,)
    return (max(MIN_MARGIN_BYTES, OVERHEAD_HIGH_BYTES - rules_for(fmt).DEFAULT_OVERHEAD_BYTES),)


def margin_note(*, formats: Iterable[str], budget: Budget) -> str:
    """One line saying which margin is kept and why (for plan and fit output)."""
    parts = []
    for fmt in sorted(set(formats)):
        m = default_margin(fmt=fmt, budget=budget)
        gib = "/".join(f"{x / GIB:.2f}" for x in m)
        if budget.margin is not None:
            why = "--margin"
        elif budget.overhead is not None:
            why = "default with a given overhead, which is taken as measured"
        else:
            why = (f"default: {fmt} assumes {rules_for(fmt).DEFAULT_OVERHEAD_BYTES / MIB:.0f} MiB of CUDA/allocator "
                   f"overhead per GPU, published readings reach {OVERHEAD_HIGH_BYTES / GIB:.1f} GiB")
        parts.append(f"{gib} GiB" + (f" for {fmt}" if len(set(formats)) > 1 else "") + f" ({why})")
    tail = ". Headroom is after it; --margin 0 turns it off." if any(
        any(default_margin(fmt=f, budget=budget)) for f in set(formats)) else "; --margin keeps some free."
    return "Safety margin kept free on every GPU: " + "; ".join(parts) + tail


@dataclass(frozen=True)
class Configuration:
    """One point of the search space. ``key`` is stable across runs and processes."""

    variant: Variant
    max_seq_len: int
    cache: str
    split: Split

    @property
    def key(self) -> str:
        return f"{self.variant.key}|ctx={self.max_seq_len}|cache={self.cache}|split={self.split.label}"


@dataclass(frozen=True)
class PlanRow:
    """A configuration and its predicted memory."""

    config: Configuration
    verdict: VramVerdict


def auto_contexts(default_ctx: int, *, step: int = 256, floor: int = MIN_AUTO_CONTEXT) -> tuple[int, ...]:
    """Powers of two from ``floor`` up to the model's default context, plus that context itself."""
    out: list[int] = []
    c = floor
    while c < default_ctx:
        out.append(c)
        c *= 2
    top = default_ctx - default_ctx % step if default_ctx >= step else default_ctx
    out.append(max(top, 1))
    return tuple(sorted(set(out)))


def evaluate(
    *,
    config: Configuration,
    budget: Budget,
    runtime: RuntimeOptions = RuntimeOptions(),
) -> VramVerdict:
    """Predict the memory of one configuration against ``budget``.

    A format module that defines ``place_config(variant, *, max_seq_len, cache, split, runtime,
    budget_per_device, overhead_per_device) -> VramVerdict`` places the configuration itself (gguf:
    llama.cpp's layer split); otherwise its ``variant_plan`` is placed by :func:`optimizer.vram.place`.
    """
    rules = rules_for(config.variant.format)
    overhead = budget.overhead if budget.overhead is not None else (rules.DEFAULT_OVERHEAD_BYTES,)
    margin = default_margin(fmt=config.variant.format, budget=budget)
    place_config = getattr(rules, "place_config", None)
    if place_config is not None:  # the format places layers itself (gguf: llama.cpp's layer split)
        verdict: VramVerdict = place_config(
            config.variant, max_seq_len=config.max_seq_len, cache=config.cache, split=config.split,
            runtime=runtime, budget_per_device=budget.per_device, overhead_per_device=overhead,
        )
        return with_margin(verdict, margin)
    problem = getattr(rules, "config_problem", None)
    why = problem(config.variant, max_seq_len=config.max_seq_len, cache=config.cache, runtime=runtime) if problem else None
    if why:  # the engine cannot run it at all: unplaced, with the reason
        budgets, overheads = split_budgets(config.split, budget.per_device, overhead)
        return unplaced(budgets=budgets, overheads=overheads, reason=why)
    plan = rules.variant_plan(config.variant, max_seq_len=config.max_seq_len, cache=config.cache, runtime=runtime)
    return place(plan=plan, split=config.split, budgets=budget.per_device, overhead_bytes=overhead, margin_bytes=margin)


def check_caches(variants: Sequence[Variant], caches: Iterable[str]) -> tuple[str, ...]:
    """Validate cache names against the variants' formats.

    With one format every name must belong to it. With several formats (e.g. exl2 and gguf
    sources of one model) a name must belong to at least one of them, and each variant is searched
    with the names of its own format (:func:`enumerate_configs`); a format left with none is an error.
    """
    caches = tuple(c.lower() for c in caches)
    formats = sorted({v.format for v in variants})
    for fmt in formats:
        allowed = rules_for(fmt).CACHE_MODE_NAMES
        bad = [c for c in caches if c not in allowed]
        if bad and (len(formats) == 1 or len(bad) == len(caches)
                    or any(all(c not in rules_for(f).CACHE_MODE_NAMES for f in formats) for c in bad)):
            choices = getattr(rules_for(fmt), "CACHE_MODE_HELP", ", ".join(allowed))
            raise BadOptionError(f"unknown cache mode {bad[0]!r} for {fmt} (choose from {choices})")
    return caches


def enumerate_configs(
    *,
    variants: Sequence[Variant],
    contexts: Sequence[int] | None,
    caches: Sequence[str] | None,
    split: Split,
) -> list[Configuration]:
    """Every configuration, variant-major (the order that minimizes model loads).

    ``contexts`` None means the automatic grid per variant; ``caches`` None means every cache
    mode of the variant's format.
    """
    out: list[Configuration] = []
    for v in variants:
        rules = rules_for(v.format)
        ctxs = contexts or auto_contexts(rules.default_context(v), step=rules.context_step())
        cms = tuple(c for c in caches if c in rules.CACHE_MODE_NAMES) if caches else default_cache_modes(rules)
        for cache in cms:
            for ctx in ctxs:
                out.append(Configuration(variant=v, max_seq_len=int(ctx), cache=cache, split=split))
    return out


def plan_rows(
    *,
    configs: Iterable[Configuration],
    budget: Budget,
    runtime: RuntimeOptions = RuntimeOptions(),
) -> list[PlanRow]:
    """Evaluate every configuration."""
    return [PlanRow(config=c, verdict=evaluate(config=c, budget=budget, runtime=runtime)) for c in configs]


@dataclass(frozen=True)
class FitResult:
    """Largest context that fits for one (variant, cache): ``max_seq_len`` None if not even ``step``."""

    variant: Variant
    cache: str
    split: Split
    max_seq_len: int | None
    default_ctx: int
    verdict: VramVerdict | None


def max_context(
    *,
    variant: Variant,
    cache: str,
    split: Split,
    budget: Budget,
    runtime: RuntimeOptions = RuntimeOptions(),
) -> FitResult:
    """Largest multiple of the format's context step, up to the model's default context, that fits.

    On one GPU memory never decreases with context length, so a binary search over multiples of
    the step is exact with respect to the VRAM model. Across GPUs it is not: the placement itself
    depends on the context (``set_device_map`` reserves context-sized buffers, autosplit places
    around the cache), so a longer context can fit where a shorter one does not. There the binary
    search gives a lower bound and every longer context is then tried, from the longest down
    (at most ``default_ctx / step`` evaluations of a few tens of microseconds each).
    """
    rules = rules_for(variant.format)
    step = rules.context_step()
    default_ctx = rules.default_context(variant)
    hi = max(default_ctx // step, 1)

    def fitting(n: int) -> VramVerdict | None:
        cfg = Configuration(variant=variant, max_seq_len=n * step, cache=cache, split=split)
        v = evaluate(config=cfg, budget=budget, runtime=runtime)
        return v if v.fits else None

    best = _largest(hi, fitting)
    if split.mode != "single":
        for n in range(hi, best[0] if best else 0, -1):
            got = fitting(n)
            if got is not None:
                best = (n, got)
                break
    return FitResult(
        variant=variant,
        cache=cache,
        split=split,
        max_seq_len=best[0] * step if best else None,
        default_ctx=default_ctx,
        verdict=best[1] if best else None,
    )


#: The prompt chunk (tokens) ``fit`` also tries when a larger one was asked for: without flash-attn exllamav2 holds
#: the attention scores of a whole chunk (they grow with its square), so a smaller chunk can hold far more context.
SMALL_CHUNK = 512


def smaller_chunk_gains(
    *, fits: Sequence[FitResult], budget: Budget, runtime: RuntimeOptions, chunk: int = SMALL_CHUNK,
) -> list[tuple[FitResult, FitResult]]:
    """``(asked, smaller)`` for each fit whose (variant, cache, split) holds more context with a ``chunk``-token
    prompt chunk than with ``runtime.chunk_len`` (empty when that is not larger than ``chunk``). Prompt processing
    in smaller chunks is slower; the caller says so."""
    if runtime.chunk_len <= chunk:
        return []
    small = replace(runtime, chunk_len=chunk)
    out = []
    for f in fits:
        g = max_context(variant=f.variant, cache=f.cache, split=f.split, budget=budget, runtime=small)
        if (g.max_seq_len or 0) > (f.max_seq_len or 0):
            out.append((f, g))
    return out


_T = TypeVar("_T")


def _largest(hi: int, test: Callable[[int], _T | None]) -> tuple[int, _T] | None:
    """Largest ``n`` in ``1..hi`` whose ``test(n)`` is not None (monotone: true up to some n), with it."""
    top = test(hi)
    if top is not None:
        return hi, top
    best: tuple[int, _T] | None = None
    lo_n, hi_n = 1, hi - 1
    while lo_n <= hi_n:
        mid = (lo_n + hi_n) // 2
        got = test(mid)
        if got is not None:
            best = (mid, got)
            lo_n = mid + 1
        else:
            hi_n = mid - 1
    return best


def split_search(
    *,
    variant: Variant,
    cache: str,
    n_devices: int,
    budget: Budget,
    runtime: RuntimeOptions = RuntimeOptions(),
) -> tuple[FitResult, FitResult] | None:
    """The longest context over manual splits, and over autosplit reserves, on ``n_devices`` GPUs.

    Returns (best ``gpu_split``, best reserves) as :class:`FitResult` whose ``split`` is the setting
    found at that context (see :mod:`optimizer.splitsearch`), or None for a format that places
    layers itself (GGUF). Exact with respect to the VRAM model only in the sense that every answer
    is a placement the model says fits; the search itself is greedy.
    """
    from optimizer.splitsearch import best_manual_split, best_reserves

    rules = rules_for(variant.format)
    if getattr(rules, "place_config", None) is not None or n_devices < 2:
        return None
    step = rules.context_step()
    default_ctx = rules.default_context(variant)
    hi = max(default_ctx // step, 1)
    per = budget.per_device * n_devices if len(budget.per_device) == 1 else budget.per_device
    ov = budget.overhead if budget.overhead is not None else (rules.DEFAULT_OVERHEAD_BYTES,)
    ov = ov * n_devices if len(ov) == 1 else ov
    mg = default_margin(fmt=variant.format, budget=budget)
    mg = mg * n_devices if len(mg) == 1 else mg
    out = []
    for search in (best_manual_split, best_reserves):
        def test(n: int, search: Callable[..., tuple[Split, VramVerdict] | None] = search) -> (
                tuple[Split, VramVerdict] | None):
            plan = rules.variant_plan(variant, max_seq_len=n * step, cache=cache, runtime=runtime)
            return search(plan=plan, budgets=per, overheads=ov, margins=mg)

        best = _largest(hi, test)
        out.append(FitResult(
            variant=variant, cache=cache,
            split=best[1][0] if best else Split(mode="auto", n_devices=n_devices),
            max_seq_len=best[0] * step if best else None, default_ctx=default_ctx,
            verdict=best[1][1] if best else None,
        ))
    return out[0], out[1]


def better_split(auto: FitResult, found: tuple[FitResult, FitResult] | None) -> FitResult | None:
    """Of :func:`split_search`'s answers, the one holding the longest context when it beats ``auto``.

    A manual split wins ties with reserves: its placement does not depend on load-time allocations.
    """
    if found is None:
        return None
    manual, reserves = found
    best = manual if (manual.max_seq_len or 0) >= (reserves.max_seq_len or 0) else reserves
    return best if (best.max_seq_len or 0) > (auto.max_seq_len or 0) else None
