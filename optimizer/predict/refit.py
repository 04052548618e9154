"""Predictions for a whole search space, refitted on the measurements made so far.

Each configuration (variant, cache, context, split) with its VRAM verdict gets predicted perplexity and decode tok/s
(:mod:`optimizer.predict.configs`). Measurements then anchor them: every measured perplexity, divided by its cache's
predicted penalty, is an anchor ``(effective bits, perplexity)`` of its format's curve (a format without an anchor of
its own takes the level of one that has); every measured speed is a point of :func:`~optimizer.predict.speed.fit_decode`.
Without a known GPU the speed model runs on a stand-in GPU with a wide interval until the first measured speed
calibrates it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from optimizer.predict.configs import kv_read_factor, predict_decode, predict_quality, shown_fill, variant_bits
from optimizer.predict.estimate import Estimate
from optimizer.predict.gpus import find_gpu
from optimizer.predict.quality import QualityFit, cache_penalty, fit
from optimizer.predict.speed import ENGINES, engine_for
from optimizer.space import Configuration
from optimizer.vram import VramVerdict

#: GPU whose bandwidth stands in when none is named (only the shape matters until a speed is measured).
STAND_IN_GPU = "RTX 4090"
#: Relative uncertainty of the prior's bandwidth slope (time per weight byte) while no cache has two measured sizes:
#: the spread of the fitted weight-read efficiency across engines and GPUs (prediction.md section 3)
SLOPE_PRIOR_REL = 0.35


@dataclass(frozen=True)
class SpaceEntry:
    """One configuration of the space and its VRAM verdict."""

    key: str
    config: Configuration
    verdict: VramVerdict


@dataclass(frozen=True)
class Observation:
    """A measured configuration: perplexity and/or generation tok/s (None when not measured)."""

    key: str
    ppl: float | None
    tok_s: float | None


@dataclass(frozen=True)
class SpeedFit:
    """Decode time per token fitted on this host: ``slope * W + intercept[cache] + kv_time`` (seconds).

    ``span[cache]``: the smallest and largest weight bytes measured with that cache. ``fitted`` False means no cache
    had two measured sizes, so ``slope`` is the prior's bandwidth slope, not a measurement."""

    slope: float
    intercept: dict[str, float]
    span: dict[str, tuple[float, float]]
    fitted: bool
    prior_ratio: float = 1.0  #: median measured / prior time per token over the measured configurations

    def predict(self, cache: str, weights: float, kv_time: float, *, prior: Estimate) -> Estimate:
        """tok/s for ``weights`` bytes with ``cache``: +-4 % inside the sizes measured (with that cache when the slope
        is the prior's), wider the further outside; with the prior's slope, the slope's own uncertainty
        (``SLOPE_PRIOR_REL``) times the extrapolated time is added. A mode without an intercept scales the prior time
        by the measured configurations' median ratio to their priors and gets a +-35 % interval."""
        if cache in self.intercept:
            t = self.slope * weights + self.intercept[cache] + kv_time
            lo, hi = (min(a for a, _ in self.span.values()), max(b for _, b in self.span.values())) if self.fitted \
                else self.span[cache]
            out = max(0.0, (lo - weights) / lo, (weights - hi) / hi)
            rel = 0.04 + 0.3 * out
            if not self.fitted:
                rel += SLOPE_PRIOR_REL * self.slope * max(lo - weights, weights - hi, 0.0) / max(t, 1e-9)
        else:
            t = self.prior_ratio / prior.value
            rel = 0.35
        v = 1 / max(t, 1e-9)
        return Estimate(v, v * max(1 - rel, 0.05), v * (1 + rel))


class SpacePredictor:
    """Predicted ``(perplexity, tok/s)`` per configuration key, refitted by :meth:`refit`."""

    def __init__(self, entries: Sequence[SpaceEntry], *, gpus: Sequence[str] = (), fill: int | None = None) -> None:
        self.entries = {e.key: e for e in entries}
        self.gpus = tuple(find_gpu(g).name for g in gpus)
        self.known_gpu = bool(self.gpus)
        self.fill = fill
        self._bits = {e.key: predict_quality(e.config.variant, e.config.cache)[2] for e in entries}
        self._layers = {}
        for e in entries:
            vb = variant_bits(e.config.variant)
            self._layers[e.key] = vb.n_layers if vb else 0

    def _fill(self, e: SpaceEntry) -> int:
        return shown_fill(e.config.max_seq_len) if self.fill is None else max(min(self.fill, e.config.max_seq_len - 128), 1)

    def _penalties(self, obs: Sequence[Observation]) -> dict[tuple[str, str], Estimate]:
        """Measured cache penalties, ``(format, cache) -> added ln ppl``: the mean log-ratio to the lossless cache of
        the same variant (paired on the same windows), +-(0.001 + 30 %)."""
        ppl: dict[tuple[str, str], float] = {}
        for o in obs:
            e = self.entries.get(o.key)
            if e is not None and o.ppl is not None and o.ppl > 0:
                ppl[(e.config.variant.key, e.config.cache)] = o.ppl
        diffs: dict[tuple[str, str], list[float]] = {}
        fmt_of = {e.config.variant.key: e.config.variant.format for e in self.entries.values()}
        for (vk, cache), p in ppl.items():
            base = ppl.get((vk, "fp16")) or ppl.get((vk, "f16"))
            if base is not None and cache not in ("fp16", "f16"):
                diffs.setdefault((fmt_of[vk], cache), []).append(math.log(p / base))
        out = {}
        for k, ds in diffs.items():
            d = sum(ds) / len(ds)
            w = 0.001 + 0.3 * abs(d)
            out[k] = Estimate(d, d - w, d + w)
        return out

    def _quality_fits(self, obs: Sequence[Observation],
                      pens: dict[tuple[str, str], Estimate]) -> dict[str, QualityFit]:
        anchors: dict[str, list[tuple[float, float]]] = {}
        for o in obs:
            e = self.entries.get(o.key)
            b = self._bits.get(o.key)
            if e is None or b is None or o.ppl is None or not o.ppl > 0:
                continue
            fmt = e.config.variant.format
            pen = (pens.get((fmt, e.config.cache)) or cache_penalty(fmt, e.config.cache)).value
            anchors.setdefault(fmt, []).append((b, o.ppl / math.exp(pen)))
        fmts = {e.config.variant.format for e in self.entries.values()}
        fits = {f: fit(f if f in ("exl2", "exl3", "gguf") else "exl2", anchors.get(f, ())) for f in fmts}
        levels = [f.log_ref for f in fits.values() if f.absolute]
        if levels:  # a format without anchors takes the level of the measured ones (one model, one reference)
            ref = sum(levels) / len(levels)
            for f, q in fits.items():
                if not q.absolute:
                    fits[f] = replace(q, log_ref=ref, absolute=True,
                                      alternatives=tuple((c, a, ref) for c, a, _ in q.alternatives))
        return fits

    def _from_same_variant(self, e: SpaceEntry, measured: dict[str, dict[str, float]],
                           pens: dict[tuple[str, str], Estimate]) -> Estimate | None:
        """A variant measured with some cache: its other caches follow from that measurement and the penalties
        (the curve no longer matters for it; this is what catches a variant that is worse than the curve)."""
        got = measured.get(e.config.variant.key)
        if not got:
            return None
        fmt, cache = e.config.variant.format, e.config.cache
        if cache in got:
            return Estimate(got[cache], got[cache], got[cache])
        c0 = next((c for c in ("fp16", "f16") if c in got), next(iter(got)))

        def pen(c: str) -> Estimate:
            return pens.get((fmt, c)) or cache_penalty(fmt, c)

        pc, p0 = pen(cache), pen(c0)
        base = got[c0]
        return Estimate(base * math.exp(pc.value - p0.value), base * math.exp(pc.low - p0.high),
                        base * math.exp(pc.high - p0.low))

    def _kv_time(self, e: SpaceEntry) -> float:
        """Seconds per token the physical model gives the cache read at this entry's fill."""
        gpu = find_gpu(self.gpus[0] if self.gpus else STAND_IN_GPU)
        kv = sum(d.cache for d in e.verdict.devices) / max(e.config.max_seq_len, 1)
        kv *= kv_read_factor(e.config.variant.format, e.config.cache)
        eng = engine_for(e.config.variant.format if e.config.variant.format in ("exl2", "exl3", "gguf") else "exl2")
        return kv * self._fill(e) / (eng.eta_kv.value * gpu.bandwidth)

    def _speed(self, e: SpaceEntry) -> Estimate | None:
        """The physical model's prior (no calibration)."""
        v = e.config.variant
        return predict_decode(e.verdict, fmt=v.format, cache=e.config.cache, max_seq_len=e.config.max_seq_len,
                              n_layers=self._layers[e.key] or 1, gpus=self.gpus or (STAND_IN_GPU,), fill=self._fill(e))

    def _weights(self, e: SpaceEntry) -> int:
        return sum(d.weights for d in e.verdict.devices)

    def _speed_fit(self, obs: Sequence[Observation]) -> SpeedFit | None:
        """``t - kv_time = a * W + b[cache]`` over the measured speeds: one slope (bandwidth), one intercept per cache."""
        pts: dict[str, list[tuple[float, float]]] = {}
        ratios = []
        for o in obs:
            e = self.entries.get(o.key)
            if e is None or o.tok_s is None or not o.tok_s > 0:
                continue
            prior = self._speed(e)
            if prior is not None:
                ratios.append(prior.value / o.tok_s)
            pts.setdefault(e.config.cache, []).append((float(self._weights(e)), 1 / o.tok_s - self._kv_time(e)))
        if not pts:
            return None
        num = den = 0.0
        for ps in pts.values():
            mw = sum(w for w, _ in ps) / len(ps)
            mt = sum(t for _, t in ps) / len(ps)
            num += sum((w - mw) * (t - mt) for w, t in ps)
            den += sum((w - mw) ** 2 for w, _ in ps)
        gpu = find_gpu(self.gpus[0] if self.gpus else STAND_IN_GPU)
        fitted = den > 0 and num > 0
        slope = num / den if fitted else 1 / (ENGINES["exl2"].eta_w.value * gpu.bandwidth)
        b = {c: sum(t for _, t in ps) / len(ps) - slope * sum(w for w, _ in ps) / len(ps) for c, ps in pts.items()}
        span = {c: (min(w for w, _ in ps), max(w for w, _ in ps)) for c, ps in pts.items()}
        ratios.sort()
        return SpeedFit(slope=slope, intercept=b, span=span, fitted=fitted,
                        prior_ratio=ratios[len(ratios) // 2] if ratios else 1.0)

    def refit(self, obs: Sequence[Observation] = ()) -> dict[str, tuple[Estimate, Estimate]]:
        """``key -> (perplexity or ratio, decode tok/s)`` for every configuration, given the observations.

        Measured speeds replace the priors (:class:`SpeedFit`): time per token = slope x weight bytes + an intercept
        per cache mode (+ the modelled cache read at the fill); +-4 % inside the measured sizes, wider outside; a
        cache mode not measured yet keeps the prior's ratio to the measured modes, +-35 %.
        """
        pens = self._penalties(obs)
        measured_ppl: dict[str, dict[str, float]] = {}
        for o in obs:
            m = self.entries.get(o.key)
            if m is not None and o.ppl is not None and o.ppl > 0:
                measured_ppl.setdefault(m.config.variant.key, {})[m.config.cache] = o.ppl
        fits = self._quality_fits(obs, pens)
        sf = self._speed_fit(obs)
        out: dict[str, tuple[Estimate, Estimate]] = {}
        for k, e in self.entries.items():
            v = e.config.variant
            ppl, _, _ = predict_quality(v, e.config.cache, fits[v.format], pens.get((v.format, e.config.cache)))
            ppl = self._from_same_variant(e, measured_ppl, pens) or ppl
            speed = self._speed(e)
            if speed is None:
                speed = Estimate(1.0, 0.0, 1e9)
            elif sf is not None:
                speed = sf.predict(e.config.cache, float(self._weights(e)), self._kv_time(e), prior=speed)
            elif not self.known_gpu:
                speed = Estimate(speed.value, speed.value / 3, speed.value * 3)
            out[k] = (ppl, speed)
        return out

