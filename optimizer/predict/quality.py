"""Perplexity against bits per weight: one curve per format, fixed to a model by measured anchors.

Model (``docs/prediction.md``): ``ln(ppl(b) / ppl_ref) = A * exp(-c * b)`` where ``b`` is the decoder's
exact bits per weight. With no anchor, ``A = exp(c * beta_f)``, the format's pooled curve (a model's own
sensitivity is unknown: ``beta`` shifts by +-``DELTA_SIGMA`` bits give the interval) and the result is the
ratio ``ppl / ppl_ref`` (``ppl_ref`` = the unquantized model). One anchor fixes ``ppl_ref``; two fix ``A``
and ``ppl_ref`` exactly (``c`` held at the rate-distortion slope ln 4); three or more fit ``c`` too.

Constants (refitted 2026-11-29 by ``benchmarks/ppl_lomo.py`` on ``data/published-ppl.csv``: the exllamav3
``doc/exl3.md`` charts, 4 models x EXL2/EXL3/GGUF, plus llama.cpp's GGUF tables of Llama-3-8B, Llama-3-70B and
Llama-2-70B with their FP16 perplexity): per format, the slope ``c`` shared by its curves and ``beta`` = the mean
over its curves of ``ln(A)/c``, points with b >= 2.4 (``/work/shared/reference/prediction.md`` §2.3-2.4 for the
model). ``benchmarks/predict_accuracy.py`` re-measures the error leaving one model out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from optimizer.predict.estimate import Estimate


@dataclass(frozen=True)
class Curve:
    """A format's curve. ``c`` in 1/bit, ``beta`` in bits (pooled fit over all published curves); ``c_anchored``:
    the slope used when two anchors fix the rest."""

    c: float
    beta: float
    c_anchored: float


#: Gaussian rate-distortion slope (D ~ 2^-2b, prediction.md §2.6): the two-anchor slope. Leaving one model out it
#: interpolates as well as or better than slopes pooled per format (0.41 % vs 0.69 % median, 7 units; 0.39 % vs
#: 0.41 %, the 4 chart models), with no fitted constant and no curve left out of a pool.
RD_SLOPE = math.log(4)
#: Per-format constants, refitted 2026-11-29 on 7 units (module docstring; ``benchmarks/ppl_lomo.py`` prints them).
CURVES: dict[str, Curve] = {
    "exl2": Curve(c=1.060, beta=1.881, c_anchored=RD_SLOPE),
    "exl3": Curve(c=1.360, beta=1.308, c_anchored=RD_SLOPE),
    "gguf": Curve(c=1.120, beta=1.640, c_anchored=RD_SLOPE),
}
#: Spread of a model's own sensitivity offset (bits) around the format curve. The 7 units' offsets have a standard
#: deviation of 0.49 bits, but curve-shape misfit (cliffs below 3 bpw) adds to it: leaving one model out, +-0.7 bits
#: covers 67 % of the published points (about one standard deviation), the earlier 0.5 only 50 %.
DELTA_SIGMA = 0.7
#: Relative noise floor of an anchored prediction (run-to-run spread of a 20 x 2048-token evaluation).
ANCHORED_FLOOR = 0.003
_C_GRID = tuple(0.4 + 0.02 * i for i in range(131))  # 0.4 .. 3.0


@dataclass(frozen=True)
class QualityFit:
    """``ln ppl(b) = log_ref + A * exp(-c * b)``; ``alternatives`` are plausible ``(c, A, log_ref)`` triples
    that span the interval. ``absolute`` False means ``log_ref`` = 0 and predictions are ratios to FP16."""

    fmt: str
    c: float
    a: float
    log_ref: float
    absolute: bool
    alternatives: tuple[tuple[float, float, float], ...] = ()
    #: ``(b_lo, b_hi, fit)``: between two neighbouring anchors, the curve through just those two (one odd variant
    #: then moves only its neighbours' predictions); outside every piece the global fit applies
    pieces: tuple[tuple[float, float, QualityFit], ...] = ()

    def log_ppl(self, bits: float) -> float:
        return self.log_ref + self.a * math.exp(-self.c * bits)

    def predict(self, bits: float) -> Estimate:
        """Perplexity (``absolute``) or ratio to FP16 at ``bits`` per weight."""
        _check_bits(bits)
        for lo, hi, piece in self.pieces:
            if lo <= bits <= hi:
                return piece.predict(bits)
        v = math.exp(self.log_ppl(bits))
        alts = [math.exp(r + a * math.exp(-c * bits)) for c, a, r in self.alternatives]
        est = Estimate.spread(v, *alts)
        return est.widened(ANCHORED_FLOOR) if self.absolute else est


def _check_bits(b: float) -> None:
    if not isinstance(b, (int, float)) or isinstance(b, bool) or not math.isfinite(b) or not 0.5 <= b <= 32:
        raise ValueError(f"bits per weight must be a number in [0.5, 32], got {b!r}")


def curve_for(fmt: str) -> Curve:
    try:
        return CURVES[fmt.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown format {fmt!r} (choose from {', '.join(CURVES)})") from None


def _solve(c: float, pts: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Least squares of ``ln p = r + A x`` with ``x = exp(-c b)`` and ``A >= 0``; returns ``(A, r)``."""
    xs = [math.exp(-c * b) for b, _ in pts]
    ys = [math.log(p) for _, p in pts]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    a = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx > 0 else 0.0
    a = max(a, 0.0)
    return a, my - a * mx


def _sse(c: float, pts: Sequence[tuple[float, float]]) -> float:
    a, r = _solve(c, pts)
    return sum((math.log(p) - r - a * math.exp(-c * b)) ** 2 for b, p in pts)


def fit(fmt: str, anchors: Sequence[tuple[float, float]] = (), *, curve: Curve | None = None,
        sigma: float = DELTA_SIGMA) -> QualityFit:
    """Fix the format curve to a model with measured ``(bits, perplexity)`` anchors (see module docstring).

    ``curve`` overrides the shipped constants (the accuracy benchmark refits them leaving one model out).
    """
    cv = curve or curve_for(fmt)
    pts = []
    for b, p in anchors:
        _check_bits(b)
        if not isinstance(p, (int, float)) or not math.isfinite(p) or p <= 0:
            raise ValueError(f"an anchor's perplexity must be a positive number, got {p!r}")
        pts.append((float(b), float(p)))
    bits_distinct = {b for b, _ in pts}
    if len(bits_distinct) < 2:  # 0 or 1 distinct bits: the model's offset is unknown, use the prior
        def a_of(shift: float) -> float:
            return math.exp(cv.c * (cv.beta + shift))
        if not pts:
            alts = tuple((cv.c, a_of(s), 0.0) for s in (-sigma, sigma))
            return QualityFit(fmt, cv.c, a_of(0.0), 0.0, False, alts)
        b1 = pts[0][0]
        lp1 = sum(math.log(p) for _, p in pts) / len(pts)
        alts = tuple((cv.c, a_of(s), lp1 - a_of(s) * math.exp(-cv.c * b1)) for s in (-sigma, sigma))
        return QualityFit(fmt, cv.c, a_of(0.0), lp1 - a_of(0.0) * math.exp(-cv.c * b1), True, alts)
    if len(bits_distinct) == 2:
        c = cv.c_anchored
        a, r = _solve(c, pts)
        alts = tuple((k * c, *_solve(k * c, pts)) for k in (0.75, 1.35))
        return QualityFit(fmt, c, a, r, True, alts)
    c = min(_C_GRID, key=lambda k: _sse(k, pts))
    a, r = _solve(c, pts)
    alts = tuple((k * c, *_solve(k * c, pts)) for k in (0.8, 1.25))
    by_bits: dict[float, list[float]] = {}
    for b, p in pts:
        by_bits.setdefault(b, []).append(math.log(p))
    knots = sorted((b, math.exp(sum(v) / len(v))) for b, v in by_bits.items())
    pieces = tuple((b0, b1, fit(fmt, [(b0, p0), (b1, p1)], curve=replace(cv, c_anchored=c), sigma=sigma))
                   for (b0, p0), (b1, p1) in zip(knots, knots[1:], strict=False))
    return QualityFit(fmt, c, a, r, True, alts, pieces)


def quality(fmt: str, bits: Sequence[float], anchors: Sequence[tuple[float, float]] = (),
            params_b: float | None = None) -> list[Estimate]:
    """Predicted perplexity for each ``bits`` value (decoder bits per weight, head as the engine reads it).

    Args:
        fmt: ``exl2``, ``exl3`` or ``gguf``.
        bits: exact bits per weight of each variant (e.g. from the safetensors headers).
        anchors: measured ``(bits, perplexity)`` pairs of the same model and evaluation.
        params_b: the model's parameter count in billions, if known; below 3 B the prior spread of a model's
            sensitivity is widened by half (small models are the least predictable in the published data).

    Returns:
        One :class:`Estimate` per ``bits`` value: the ratio ``ppl / ppl_fp16`` when ``anchors`` is empty,
        else perplexity in the anchors' unit.
    """
    if params_b is not None and (not isinstance(params_b, (int, float)) or not params_b > 0):
        raise ValueError(f"params_b must be a positive number of billions, got {params_b!r}")
    sigma = DELTA_SIGMA * (1.5 if params_b is not None and params_b < 3 else 1.0)
    f = fit(fmt, anchors, sigma=sigma)
    return [f.predict(float(b)) for b in bits]


# --- KV-cache precision ----------------------------------------------------------------------------

#: exllamav2 cache modes: added ln-perplexity (value, low, high). Q4 from ``doc/qcache_eval.md`` (mean +0.47 %,
#: max +1.5 %), FP8 (+1.3 % mean, +4.2 % max); Q6/Q8 by the 2^-2b rule (prediction.md §4.1, §4.4).
EXL2_CACHE: dict[str, tuple[float, float, float]] = {
    "fp16": (0.0, 0.0, 0.0),
    "q8": (0.0001, 0.0, 0.0005),
    "q6": (0.0005, 0.0002, 0.001),
    "q4": (0.0047, 0.002, 0.015),
    "fp8": (0.013, 0.005, 0.04),
}
#: llama.cpp per-half (K or V) cache types: q8_0 from PR #7412 (Llama-3-8B), q4_0 from ik_llama.cpp #1509.
GGUF_HALF: dict[str, tuple[float, float, float]] = {
    "f16": (0.0, 0.0, 0.0),
    "q8_0": (0.0004, 0.0001, 0.0015),
    "q4_0": (0.008, 0.003, 0.05),
}
_UNKNOWN = (0.01, 0.0, 0.1)


def _half_bits(b: int, *, key: bool) -> tuple[float, float, float]:
    """A K or V half stored at ``b`` bits (exllamav3 style): Q4 K+V = exl2's Q4, scaled by 4^(4-b); K counts double."""
    base = EXL2_CACHE["q4"]
    w = (2.0 if key else 1.0) / 3.0
    f = 4.0 ** (4 - b) * w
    return (base[0] * f, base[1] * f, base[2] * f)


def cache_penalty(fmt: str, cache: str) -> Estimate:
    """Added ``ln(ppl)`` of a cache mode against an FP16 cache (about the KL divergence it adds).

    exl2: ``fp16``, ``fp8``, ``q8``, ``q6``, ``q4``. gguf: ``f16``, ``q8_0``, ``q4_0`` or ``K/V`` pairs such as
    ``q8_0/q4_0``. Other names of the form ``k<bits>v<bits>`` / ``<k>,<v>`` / ``<k>/<v>`` (exllamav3) use the
    2^-2b rule; an unknown name gets a wide prior. Context-length dependence is not modelled (prediction.md §4.4).
    """
    import re

    name = cache.lower().strip()
    fmt = fmt.lower()
    if fmt == "exl2" and name in EXL2_CACHE:
        return Estimate(*EXL2_CACHE[name])
    if fmt == "gguf":
        halves = name.split("/")
        k, v = (halves[0], halves[0]) if len(halves) == 1 else (halves[0], halves[1])
        if k in GGUF_HALF and v in GGUF_HALF:
            kk, vv = GGUF_HALF[k], GGUF_HALF[v]
            return Estimate(*(x + y for x, y in zip(kk, vv, strict=True)))
    if name in ("fp16", "f16", "bf16"):
        return Estimate(0.0, 0.0, 0.0)
    m = re.fullmatch(r"k?(\d)\s*[,/_v ]\s*v?(\d)", name) or re.fullmatch(r"q(\d)()", name)
    if m:
        kb = int(m.group(1))
        vb = int(m.group(2) or kb)
        if 2 <= kb <= 8 and 2 <= vb <= 8:
            kk, vv = _half_bits(kb, key=True), _half_bits(vb, key=False)
            return Estimate(*(x + y for x, y in zip(kk, vv, strict=True)))
    return Estimate(*_UNKNOWN)
