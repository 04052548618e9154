"""One autosplit load per variant: which configurations can be measured in another one's placement.

Under autosplit ExLlamaV2 places the layers around the cache it is loading with, so a fresh load per
cache size is what its loader does. Perplexity and decode speed do not depend on where the layers
sit (same GPUs, same layers, same kernels), so the guided search loads a variant once, placed around
its roomiest configuration, and measures the others by building only their cache in that placement
(:class:`~optimizer.backends.base.LoadSpec` ``place_around``). Whether a configuration's cache fits
in a placement made for another is a question for the VRAM model, answered here
(:func:`in_placement`); those that do not fit get a placement of their own.

Only formats placed by :func:`optimizer.vram.place` (exl2) take part: a format that places layers
itself (``place_config``: exl3, gguf) keeps a fresh load per configuration. Pure and cheap (no engine).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from optimizer.formats import RuntimeOptions, rules_for
from optimizer.space import Budget, Configuration, default_margin
from optimizer.study.candidates import Candidate
from optimizer.vram import DeviceBreakdown, MemoryPlan, VramVerdict, expand_per_device, place, range_breakdown


def _plan(cfg: Configuration, runtime: RuntimeOptions) -> MemoryPlan:
    return rules_for(cfg.variant.format).variant_plan(cfg.variant, max_seq_len=cfg.max_seq_len, cache=cfg.cache,
                                                      runtime=runtime)


def reusable_pair(config: Configuration, around: Configuration, runtime: RuntimeOptions) -> bool:
    """Whether the engine can build ``config``'s cache in ``around``'s autosplit placement at all.

    Same variant and autosplit, a format placed by :func:`optimizer.vram.place`, a context no longer
    than the one placed around (the RoPE tables are sized at load) and the same prompt chunk (the
    load's ``max_input_len`` = min(chunk, context) sizes the scratch and the test forward).
    """
    rules = rules_for(config.variant.format)
    return (config.split.mode == "auto" and config.split == around.split and config.variant.key == around.variant.key
            and getattr(rules, "place_config", None) is None and config.max_seq_len <= around.max_seq_len
            and min(runtime.chunk_len, config.max_seq_len) == min(runtime.chunk_len, around.max_seq_len))


def in_placement(*, config: Configuration, around: Configuration, budget: Budget,
                 runtime: RuntimeOptions = RuntimeOptions()) -> VramVerdict | None:
    """The predicted memory of ``config`` with its cache built in the autosplit placement made around
    ``around``'s cache (bytes per device); None when :func:`reusable_pair` says the engine cannot.

    Each device keeps the layers, scratch and RoPE tables of ``around``'s load and holds ``config``'s
    cache layers on those layers, its FP16 staging pair where a quantized cache has a layer, and its
    inference transients. Autosplit places by the memory really free, so, as :func:`optimizer.vram.place`
    does for a fresh load, the answer must hold in both placements: with the overhead as assumed (no
    margin) and with the margin used up by overhead; the verdict returned is the latter's, and it fits
    only when both do.
    """
    if not reusable_pair(config, around, runtime):
        return None
    rules = rules_for(config.variant.format)
    n = max(config.split.n_devices, 1)
    overhead = budget.overhead if budget.overhead is not None else (rules.DEFAULT_OVERHEAD_BYTES,)
    margins = expand_per_device(default_margin(fmt=config.variant.format, budget=budget), n, "margin_bytes")
    budgets = expand_per_device(budget.per_device, n, "budgets")
    overheads = expand_per_device(overhead, n, "overhead_bytes")
    plan_x, plan_y = _plan(config, runtime), _plan(around, runtime)
    verdicts = []
    for m in ((0,) * n, margins) if any(margins) else ((0,) * n,):
        placed = place(plan=plan_y, split=around.split, budgets=budgets, overhead_bytes=overheads, margin_bytes=m)
        if not placed.placed:
            return VramVerdict(devices=placed.devices, placed=False, reason=placed.reason)
        devs: list[DeviceBreakdown] = []
        start = 0
        for d in placed.devices:
            end = start + d.n_modules
            x = range_breakdown(plan_x, index=d.index, budget=d.budget, overhead=d.overhead, start=start, end=end,
                                scratch=d.scratch, margin=m[d.index])
            devs.append(replace(x, rope=d.rope) if d.n_modules else x)
            start = end
        over = [d for d in devs if not d.fits]
        reason = (f"in the placement made for {around.key}: GPU {over[0].index} needs {over[0].total / 2**30:.2f} GiB"
                  if over else "")
        verdicts.append(VramVerdict(devices=tuple(devs), placed=True, reason=reason))
    bad = [v for v in verdicts if not v.fits]
    return bad[0] if bad else verdicts[-1]


def _cache_bytes(c: Candidate) -> int:
    return sum(d.cache + d.cache_staging for d in c.verdict.devices)


def shared_placements(cands: Sequence[Candidate], *, budget: Budget,
                      runtime: RuntimeOptions = RuntimeOptions()) -> dict[str, Configuration]:
    """For each autosplit candidate that fits, the configuration whose placement it is measured in.

    Per (variant, split), greedily: the roomiest configuration left (most cache bytes incl. staging,
    then the longest context) is placed around, and every configuration left whose cache fits in that
    placement (:func:`in_placement`) is measured there; the rest go round again. A candidate whose
    format cannot share a placement is absent (a fresh load of its own).
    """
    groups: dict[tuple[str, str], list[Candidate]] = {}
    for c in cands:
        cfg = c.config
        if c.verdict.fits and reusable_pair(cfg, cfg, runtime):
            groups.setdefault((cfg.variant.key, cfg.split.label), []).append(c)
    out: dict[str, Configuration] = {}
    for left in groups.values():
        while left:
            y = max(left, key=lambda c: (_cache_bytes(c), c.config.max_seq_len, c.key))
            fits = [c for c in left if c is y or _fits_in(c.config, y.config, budget, runtime)]
            for c in fits:
                out[c.key] = y.config
            left = [c for c in left if c.key not in out]
    return out


def _fits_in(config: Configuration, around: Configuration, budget: Budget, runtime: RuntimeOptions) -> bool:
    v = in_placement(config=config, around=around, budget=budget, runtime=runtime)
    return v is not None and v.fits
