"""Perplexity half of ``benchmarks/predict_accuracy.py``: leave-one-unit-out errors of ``optimizer.predict.quality``.

Data: ``optimizer/predict/data/published-ppl.csv``. A *unit* is one model under one evaluation harness: the four
exllamav3 ``doc/exl3.md`` chart models (EXL2/EXL3/GGUF, 20 x 2048 tokens) and three llama.cpp GGUF tables (wikitext-2
at 512 tokens: Llama-3-8B, Llama-3-70B, Llama-2-70B). Every figure is printed twice: on the original four units (the
earlier benchmark, reproducible) and on all seven. A held-out unit's data never enters the constants it is scored with.

* **Reference** (``ppl_ref``): the FP16 perplexity where the source prints one (llama.cpp tables); the exllamav3
  charts print none, so their reference is the model's asymptote fitted on all its curves (a stand-in for the FP16
  measurement a user would have).
* **0 anchors** -- the ratio to ``ppl_ref`` from the format curve refitted on the other units; the held-out unit's own
  sensitivity offset is unknown (0). Scored on every point with b >= 2.4. Pooling of the format offset ``beta``:
  ``mean`` / ``median`` over the format's curves, or ``factorised`` (``beta_f + delta_m`` per curve, one
  ``delta`` per unit shared by its formats, mean ``delta`` = 0: units measured in one format only still inform
  every format's offset). Coverage: the share of points inside the prior's interval (``delta`` +- sigma bits).
  Also with a whole family held out (Llama 3 and 3.1 of one size, whatever the harness), so a sibling in the pool
  cannot help.
* **2 anchors** -- the highest-bpw variant and the one nearest 3.0 bpw of the same curve; scored strictly between
  them. Slopes: pooled over the other units without the cliff-prone Llama-3.1-70B-Instruct (the earlier protocol),
  pooled over all of them, and the rate-distortion slope ``ln 4`` (no fitted constant); plus ``ln ppl`` linear.
* **rank correlation** -- Spearman between 0-anchor predictions and measured perplexity over a unit's variants.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from optimizer.predict.quality import CURVES, DELTA_SIGMA, Curve, _solve, fit

DATA = Path(__file__).resolve().parents[1] / "optimizer" / "predict" / "data" / "published-ppl.csv"
C_GRID = [0.5 + 0.01 * i for i in range(251)]
CLIFF = "Llama-3.1-70B-Instruct"
CHARTS = "exllamav3-wiki2-20x2048"
POOLS = ("mean", "median", "factorised")
#: how the shipped constants pool ``beta`` (``optimizer/predict/quality.py``)
SHIPPED_POOL = "mean"
LN4 = math.log(4)
#: slopes for a chart model's fitted asymptote (prediction.md §2.3), fixed so refitted constants leave references alone
REF_SLOPES = {"exl2": 1.291, "exl3": 1.504, "gguf": 1.211}
SIGMAS = (0.5, 0.6, 0.7, 0.8, 1.0)

Curves = dict[tuple[str, str], list[tuple[float, float]]]


@dataclass(frozen=True)
class PplData:
    """Curves keyed by (unit, format), sorted by bits; ``measured_ref``: ln FP16 perplexity where printed."""

    curves: Curves
    measured_ref: dict[str, float]

    @property
    def units(self) -> set[str]:
        return {u for u, _ in self.curves}


def load(*, charts_only: bool = False) -> PplData:
    curves: Curves = defaultdict(list)
    refs: dict[str, float] = {}
    with DATA.open() as f:
        for r in csv.DictReader(f):
            if r["head_bits"] == "3":  # the H3 points test the head, not the curve (prediction.md §2.2)
                continue
            if charts_only and r["eval"] != CHARTS:
                continue
            unit = r["model"] if r["eval"] == CHARTS else f"{r['model']} [llama.cpp]"
            curves[(unit, r["format"])].append((float(r["bpw"]), float(r["ppl"])))
            if r["ref_ppl"]:
                refs[unit] = math.log(float(r["ref_ppl"]))
    return PplData({k: sorted(v) for k, v in curves.items()}, refs)


def _sse(c: float, pts: list[tuple[float, float]]) -> float:
    a, r = _solve(c, pts)
    return sum((math.log(p) - r - a * math.exp(-c * b)) ** 2 for b, p in pts)


def pooled_slope(curves: Iterable[list[tuple[float, float]]]) -> float:
    cs = list(curves)
    return min(C_GRID, key=lambda c: sum(_sse(c, [p for p in pts if p[0] >= 2.4]) for pts in cs))


def _log_a(c: float, pts: list[tuple[float, float]], ref: float) -> tuple[float, float]:
    """(ln A, squared error) of ``ln(p) - ref = A exp(-c b)`` by least squares."""
    xs = [math.exp(-c * b) for b, _ in pts]
    ys = [math.log(p) - ref for _, p in pts]
    a = max(sum(x * y for x, y in zip(xs, ys, strict=True)) / sum(x * x for x in xs), 1e-12)
    return math.log(a), sum((y - a * x) ** 2 for x, y in zip(xs, ys, strict=True))


def curve_offsets(curves: Curves, units: set[str], refs: dict[str, float]) -> dict[str, tuple[float, dict[str, float]]]:
    """Per format, on ``units`` only: the slope shared by the curves (refs fixed) and each curve's offset
    ``ln(A)/c`` in bits (``beta_f + delta_m`` of the factorised model, prediction.md §2.3)."""
    out = {}
    for fmt in CURVES:
        own = [(u, [p for p in pts if p[0] >= 2.4]) for (u, f), pts in curves.items() if f == fmt and u in units]
        c = min(C_GRID, key=lambda k: sum(_log_a(k, pts, refs[u])[1] for u, pts in own))
        out[fmt] = (c, {u: _log_a(c, pts, refs[u])[0] / c for u, pts in own})
    return out


def factorise(offsets: dict[str, dict[str, float]], sweeps: int = 200) -> tuple[dict[str, float], dict[str, float]]:
    """``offset[f][u] = beta_f + delta_u`` by least squares (alternating means), mean delta over units = 0."""
    units = sorted({u for per in offsets.values() for u in per})
    delta = dict.fromkeys(units, 0.0)
    beta = {f: 0.0 for f in offsets}
    for _ in range(sweeps):
        beta = {f: statistics.mean(v - delta[u] for u, v in per.items()) for f, per in offsets.items()}
        delta = {u: statistics.mean(per[u] - beta[f] for f, per in offsets.items() if u in per) for u in units}
        shift = statistics.mean(delta.values())
        delta = {u: d - shift for u, d in delta.items()}
    beta = {f: statistics.mean(v - delta[u] for u, v in per.items()) for f, per in offsets.items()}
    return beta, delta


def fit_formats(curves: Curves, units: set[str], refs: dict[str, float], pool: str = "factorised",
                anchored: str = "calm") -> dict[str, Curve]:
    """Format constants from ``units`` only (``pool``: how ``beta`` is pooled; ``anchored``: the 2-anchor slope,
    ``calm`` = pooled without the cliff-prone 70B, ``all`` = pooled over all curves, ``ln4``)."""
    offs = curve_offsets(curves, units, refs)
    fac_beta, _ = factorise({f: o for f, (_, o) in offs.items()})
    out = {}
    for fmt, (c, per) in offs.items():
        beta = {"mean": statistics.mean(per.values()), "median": statistics.median(per.values()),
                "factorised": fac_beta[fmt]}[pool]
        if anchored == "ln4":
            ca = LN4
        else:
            pts = [p for (u, f), p in curves.items() if f == fmt and u in units and (anchored == "all" or u != CLIFF)]
            ca = pooled_slope(pts)
        out[fmt] = Curve(c=c, beta=beta, c_anchored=ca)
    return out


def unit_reference(data: PplData, unit: str) -> float:
    """ln(ppl_ref): the measured FP16 value, else one asymptote shared by the unit's curves (grid least squares,
    ``REF_SLOPES``)."""
    if unit in data.measured_ref:
        return data.measured_ref[unit]
    own = {f: [p for p in pts if p[0] >= 2.4] for (u, f), pts in data.curves.items() if u == unit}
    lo = min(math.log(p) for pts in own.values() for _, p in pts)
    grid = [lo - 0.2 + 0.2 * i / 400 for i in range(400)]
    return min(grid, key=lambda r: sum(_log_a(REF_SLOPES[f], pts, r)[1] for f, pts in own.items()))


def spearman(xs: list[float], ys: list[float]) -> float:
    def ranks(v: list[float]) -> list[float]:
        r = [0.0] * len(v)
        for pos, i in enumerate(sorted(range(len(v)), key=lambda i: v[i])):
            r[i] = float(pos)
        return r
    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(int(q * len(s)), len(s) - 1)]


@dataclass
class Lomo:
    """Errors collected over all held-out units."""

    e0: dict[str, list[float]]
    covered: dict[float, list[bool]]
    per_unit: dict[str, list[float]]
    e0_3: list[float]
    e2: dict[str, list[float]]
    rhos: list[float]


def family(unit: str) -> str:
    """Units of one model family held out together: Llama 3 and 3.1 of one size (base, instruct, any harness)."""
    name = unit.removesuffix(" [llama.cpp]").lower().removesuffix("-instruct")
    return name.replace("llama-3.1-", "llama-3-")


def lomo(data: PplData, *, by_family: bool = False) -> Lomo:
    units = data.units
    refs = {u: unit_reference(data, u) for u in units}
    res = Lomo({p: [] for p in POOLS}, {s: [] for s in SIGMAS}, defaultdict(list), [], defaultdict(list), [])
    for held in sorted(units):
        train = {u for u in units if (family(u) != family(held) if by_family else u != held)}
        consts = {p: fit_formats(data.curves, train, refs, p) for p in POOLS}
        anchored = {"calm": consts[SHIPPED_POOL], "all": fit_formats(data.curves, train, refs, anchored="all")}
        preds, meas = [], []
        for (u, fmt), pts in data.curves.items():
            if u != held:
                continue
            for pool in POOLS:
                prior = fit(fmt, (), curve=consts[pool][fmt])
                for b, p in pts:
                    if b >= 2.4:
                        res.e0[pool].append(abs(math.exp(refs[held]) * prior.predict(b).value / p - 1))
            for sg in SIGMAS:
                prior = fit(fmt, (), curve=consts[SHIPPED_POOL][fmt], sigma=sg)
                for b, p in pts:
                    if b >= 2.4:
                        est = prior.predict(b)
                        res.covered[sg].append(est.low <= p / math.exp(refs[held]) <= est.high)
            prior = fit(fmt, (), curve=consts[SHIPPED_POOL][fmt])
            for b, p in pts:
                est = prior.predict(b)
                preds.append(est.value)
                meas.append(p)
                if b >= 2.4:
                    res.per_unit[held].append(abs(est.value * math.exp(refs[held]) / p - 1))
                if b >= 3.0:
                    res.e0_3.append(abs(est.value * math.exp(refs[held]) / p - 1))
            _two_anchor(res, fmt, pts, anchored)
        res.rhos.append(spearman(preds, meas))
    return res


def _two_anchor(res: Lomo, fmt: str, pts: list[tuple[float, float]], consts: dict[str, dict[str, Curve]]) -> None:
    hi = max(pts)
    lo = min(pts, key=lambda q: abs(q[0] - 3.0))
    fits = {k: fit(fmt, [lo, hi], curve=c[fmt]) for k, c in consts.items()}
    fits["ln4"] = fit(fmt, [lo, hi], curve=Curve(c=LN4, beta=0.0, c_anchored=LN4))
    for b, p in pts:
        if lo[0] < b < hi[0]:
            for k, f in fits.items():
                res.e2[k].append(abs(f.predict(b).value / p - 1))
            t = (b - lo[0]) / (hi[0] - lo[0])
            res.e2["linear"].append(abs(math.exp((1 - t) * math.log(lo[1]) + t * math.log(hi[1])) / p - 1))


def offset_spread(data: PplData) -> tuple[dict[str, float], float]:
    """Each unit's sensitivity ``delta`` (bits) fitted on all units, and their standard deviation."""
    refs = {u: unit_reference(data, u) for u in data.units}
    offs = curve_offsets(data.curves, data.units, refs)
    _, delta = factorise({f: o for f, (_, o) in offs.items()})
    return delta, statistics.stdev(delta.values())


def _med(xs: list[float]) -> str:
    return f"{100 * statistics.median(xs):.2f} %"


def report(data: PplData, title: str) -> dict[str, float]:
    r = lomo(data)
    fam = lomo(data, by_family=True).e0[SHIPPED_POOL]
    e0 = r.e0[SHIPPED_POOL]
    print(f"Perplexity, leave one unit out: {title}")
    print(f"  0 anchors (ratio to FP16 ref), b>=2.4: n={len(e0):3d} median |error| {_med(e0)}  p90 {100 * pct(e0, 0.9):.1f} %"
          f"   (beta pooled as {SHIPPED_POOL}; median {_med(r.e0['median'])}, factorised {_med(r.e0['factorised'])})")
    print(f"  0 anchors, b>=3.0 only:            n={len(r.e0_3):3d} median |error| {_med(r.e0_3)}")
    print(f"  0 anchors, leaving out the whole family (Llama 3 and 3.1 of one size together): median |error| {_med(fam)}")
    print("    per unit median |error|: " + ", ".join(f"{u} {_med(v)}" for u, v in sorted(r.per_unit.items())))
    cov = {sg: sum(v) / len(v) for sg, v in r.covered.items()}
    print("    interval (delta +- sigma bits) covers: " + ", ".join(f"sigma {sg}: {100 * c:.0f} %" for sg, c in cov.items())
          + f"  (shipped sigma {DELTA_SIGMA})")
    e2 = r.e2
    print(f"  2 anchors, between them:           n={len(e2['ln4']):3d} median |error| {_med(e2['ln4'])}"
          f"  p90 {100 * pct(e2['ln4'], 0.9):.1f} %  max {100 * max(e2['ln4']):.1f} %  (slope ln 4, shipped)")
    for k, label in (("calm", "slope pooled without 70B-Instr."), ("all", "slope pooled over all units"),
                     ("linear", "ln ppl linear in bits")):
        print(f"    same anchors, {label + ':':<32} median |error| {_med(e2[k])}  p90 {100 * pct(e2[k], 0.9):.1f} %"
              f"  max {100 * max(e2[k]):.1f} %")
    print(f"  rank correlation (Spearman, 0 anchors, all formats of a unit): mean {statistics.mean(r.rhos):.3f}"
          f"  min {min(r.rhos):.3f}")
    return {"ppl0": statistics.median(e0), "ppl0_family": statistics.median(fam), "ppl0_3": statistics.median(r.e0_3),
            "ppl2": statistics.median(e2["ln4"]),
            "ppl2_fitted": statistics.median(e2["calm"]), "rho": statistics.mean(r.rhos),
            "coverage": cov.get(DELTA_SIGMA, math.nan)}


def perplexity_report() -> dict[str, float]:
    """Print the 4-unit (earlier) and 7-unit figures and the refitted constants; return the 7-unit figures."""
    report(load(charts_only=True), "4 models x EXL2/EXL3/GGUF (exllamav3 doc/exl3.md charts)")
    data = load()
    out = report(data, f"{len(data.units)} units (+ llama.cpp GGUF tables with a measured FP16 reference)")
    refs = {u: unit_reference(data, u) for u in data.units}
    allc = fit_formats(data.curves, data.units, refs, SHIPPED_POOL, anchored="ln4")
    delta, sd = offset_spread(data)
    print("  format constants refitted on all units vs shipped (c, beta, c_anchored): "
          + "; ".join(f"{f} {allc[f].c:.3f}/{allc[f].beta:.3f}/{allc[f].c_anchored:.3f} vs "
                      f"{CURVES[f].c:.3f}/{CURVES[f].beta:.3f}/{CURVES[f].c_anchored:.3f}" for f in CURVES))
    print("  unit offsets delta (bits): " + ", ".join(f"{u} {d:+.2f}" for u, d in sorted(delta.items()))
          + f"; sd {sd:.2f} (shipped sigma {DELTA_SIGMA})")
    return out
