"""The search space of a spec: every configuration with its predicted memory, in measurement order.

Work is ordered variant-major, then split, cache mode, then context *descending*, so an engine can
keep the model and rebuild only the cache (single GPU: each variant is loaded once; a manual split
is placed by ``config.max_seq_len`` and autosplit around the cache, so those reload per context /
cache size).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from optimizer.errors import StudyError
from optimizer.space import Configuration, enumerate_configs, evaluate
from optimizer.study.spec import SearchSpec
from optimizer.vram import GIB, Split, VramVerdict

#: The Optuna parameters of a trial (one per search dimension).
PARAM_NAMES = ("variant", "cache", "max_seq_len")


@dataclass(frozen=True)
class Candidate:
    """A configuration of the space with its predicted memory."""

    config: Configuration
    verdict: VramVerdict

    @property
    def key(self) -> str:
        return self.config.key

    @property
    def params(self) -> dict[str, Any]:
        return {"variant": self.config.variant.key, "cache": self.config.cache, "max_seq_len": self.config.max_seq_len}


def build_space(spec: SearchSpec) -> list[Candidate]:
    """Every configuration of ``spec`` at or above ``min_ctx``, predicted, in measurement order.

    Raises:
        StudyError: no configuration reaches ``min_ctx``.
    """
    configs = enumerate_configs(variants=spec.variants, contexts=spec.contexts, caches=spec.caches, split=spec.split)
    cands = [Candidate(config=c, verdict=evaluate(config=c, budget=spec.budget, runtime=spec.runtime))
             for c in configs if c.max_seq_len >= spec.min_ctx]
    if not cands:
        raise StudyError(f"no configuration has a context of at least --min-ctx {spec.min_ctx} tokens")
    return order_for_loads(cands)


def order_for_loads(cands: Sequence[Candidate]) -> list[Candidate]:
    """Variant-major (in the given variant order), then split, cache mode, context descending."""
    vorder: dict[str, int] = {}
    for c in cands:
        vorder.setdefault(c.config.variant.key, len(vorder))
    corder: dict[str, int] = {}
    for c in cands:
        corder.setdefault(c.config.cache, len(corder))
    return sorted(cands, key=lambda c: (vorder[c.config.variant.key], c.config.split.label,
                                        corder[c.config.cache], -c.config.max_seq_len))


def distributions(cands: Sequence[Candidate]) -> dict[str, Any]:
    """Optuna distributions of the three parameters (union over variants)."""
    from optuna.distributions import CategoricalDistribution

    def uniq(xs: Iterator[Any]) -> tuple[Any, ...]:
        return tuple(dict.fromkeys(xs))

    return {
        "variant": CategoricalDistribution(uniq(c.config.variant.key for c in cands)),
        "cache": CategoricalDistribution(uniq(c.config.cache for c in cands)),
        "max_seq_len": CategoricalDistribution(tuple(sorted(uniq(c.config.max_seq_len for c in cands)))),
    }


def config_key_of(params: dict[str, Any], split: Split) -> str:
    """The configuration key of a trial's parameters (as :attr:`Configuration.key`)."""
    return f"{params['variant']}|ctx={int(params['max_seq_len'])}|cache={params['cache']}|split={split.label}"


def predicted_json(verdict: VramVerdict) -> list[dict[str, int]]:
    """Per-device predicted breakdown in bytes (JSON); ``cache`` includes ``cache_staging`` (the quantized
    cache's FP16 staging buffer), which is also given apart."""
    return [{"index": d.index, "budget": d.budget, "total": d.total, "weights": d.weights, "cache": d.cache + d.cache_staging,
             "cache_staging": d.cache_staging, "overhead": d.overhead, "scratch": d.scratch + d.rope, "transient": d.transient}
            for d in verdict.devices]


def base_attrs(cand: Candidate) -> dict[str, Any]:
    """The user attributes that label a trial with its configuration and prediction."""
    c, v = cand.config, cand.config.variant
    return {
        "config_key": cand.key, "variant": v.key, "source": v.source, "format": v.format, "label": v.label,
        "bits": v.bits, "head_bits": v.head_bits, "split": c.split.label, "cache": c.cache,
        "max_seq_len": c.max_seq_len, "predicted": predicted_json(cand.verdict),
        "predicted_fits": cand.verdict.fits,
    }


def predicted_excess_gib(verdict: VramVerdict) -> float:
    """Predicted excess of the worst device in GiB (> 0 for a configuration that cannot be placed)."""
    return float(verdict.peak_excess) / GIB if verdict.placed else max(float(verdict.peak_excess) / GIB, 1e-3)


def measured_excess_gib(verdict: VramVerdict, measured: list[dict[str, int]]) -> float:
    """Worst device: measured peak + predicted overhead - budget, in GiB (predicted when not measured)."""
    if not measured:
        return predicted_excess_gib(verdict)
    worst = None
    for m in measured:
        i = m["index"]
        if i >= len(verdict.devices):
            continue
        d = verdict.devices[i]
        ex = (m["peak_allocated"] + d.overhead - d.budget) / GIB
        worst = ex if worst is None else max(worst, ex)
    return float(worst if worst is not None else predicted_excess_gib(verdict))
