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
from optimizer.predict.speed import Calibration, SpeedPoint, fit_decode
from optimizer.space import Configuration
from optimizer.vram import VramVerdict

#: GPU whose bandwidth stands in when none is named (only the shape matters until a speed is measured).
STAND_IN_GPU = "RTX 4090"


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

    def _quality_fits(self, obs: Sequence[Observation]) -> dict[str, QualityFit]:
        anchors: dict[str, list[tuple[float, float]]] = {}
        for o in obs:
            e = self.entries.get(o.key)
            b = self._bits.get(o.key)
            if e is None or b is None or o.ppl is None or not o.ppl > 0:
                continue
            fmt = e.config.variant.format
            pen = cache_penalty(fmt, e.config.cache).value
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

    def _calibration(self, obs: Sequence[Observation]) -> Calibration | None:
        pts = []
        gpu = find_gpu(self.gpus[0] if self.gpus else STAND_IN_GPU)
        for o in obs:
            e = self.entries.get(o.key)
            if e is None or o.tok_s is None or not o.tok_s > 0:
                continue
            devs = [d for d in e.verdict.devices if d.weights > 0]
            w = sum(d.weights for d in devs)
            kv = sum(d.cache for d in e.verdict.devices) / max(e.config.max_seq_len, 1)
            kv *= kv_read_factor(e.config.variant.format, e.config.cache)
            hops = max(len(devs) - 1, 0) * 0.33e-3
            tok_s = 1 / max(1 / o.tok_s - hops, 1e-9)
            pts.append(SpeedPoint(gpu.bandwidth, w, int(kv * self._fill(e)), self._layers.get(o.key, 0) or 1, tok_s))
        if not pts:
            return None
        return fit_decode(pts, server=gpu.host == "server")

    def refit(self, obs: Sequence[Observation] = ()) -> dict[str, tuple[Estimate, Estimate]]:
        """``key -> (perplexity or ratio, decode tok/s)`` for every configuration, given the observations."""
        fits = self._quality_fits(obs)
        cal = self._calibration(obs)
        gpus = self.gpus or (STAND_IN_GPU,)
        out: dict[str, tuple[Estimate, Estimate]] = {}
        for k, e in self.entries.items():
            v = e.config.variant
            ppl, _, _ = predict_quality(v, e.config.cache, fits[v.format])
            speed = predict_decode(e.verdict, fmt=v.format, cache=e.config.cache, max_seq_len=e.config.max_seq_len,
                                   n_layers=self._layers[k] or 1, gpus=gpus, fill=self._fill(e), calibration=cal)
            if speed is None:
                speed = Estimate(1.0, 0.0, 1e9)
            elif cal is None and not self.known_gpu:
                speed = Estimate(speed.value, speed.value / 3, speed.value * 3)
            out[k] = (ppl, speed)
        return out

