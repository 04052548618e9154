"""How well ``optimizer.predict`` predicts published perplexity and decode speed (leave one model out).

Usage: ``.venv/bin/python benchmarks/predict_accuracy.py``

Data: ``optimizer/predict/data/published-ppl.csv`` (exllamav3 ``doc/exl3.md`` charts: 4 models x EXL2/EXL3/GGUF,
one harness) and ``published-speed.csv`` (exllamav2 README table, oobabooga's 13B runs, four issue threads;
llama.cpp runs from XiongjieDai/GPU-Benchmarks-on-LLM-Inference).

Perplexity, for each held-out model (its data is never used to fit the format constants it is scored with):

* **0 anchors** -- the format curves are refitted on the other three models (pooled slope per format, offset =
  mean over models); the held-out model's own offset is unknown (0). The prediction is a ratio to the model's
  FP16 perplexity; the charts print no FP16 value, so the reference is the model's ``ppl_ref`` fitted on all its
  curves (it stands in for the FP16 measurement a user would have). Scored on every point with b >= 2.4.
* **2 anchors** -- the highest-bpw variant and the one nearest 3.0 bpw of the same curve are "measured"; the slope
  is the format's pooled slope over the other models (cliff-prone Llama-3.1-70B excluded from the pool, as for the
  shipped constants). Scored on the points strictly between the anchors.
* **naive** -- the same two anchors with the textbook rate-distortion slope ``c = ln 4`` (no fitted constants),
  and ``ln ppl`` linear in bits between them.
* **rank correlation** -- Spearman between the 0-anchor predictions and the measured perplexity over all variants
  (all formats) of each model, averaged over models.

Decode speed: see ``benchmarks/speed_accuracy.py`` (median |error| per engine and GPU: shipped priors on all rows
and without the rows the source marks host-bound, priors refitted leave-one-model-out, per-GPU fit, naive roofline).
"""

from __future__ import annotations

import csv
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.speed_accuracy import speed_report  # noqa: E402
from optimizer.predict.quality import CURVES, Curve, _solve, fit  # noqa: E402

DATA = ROOT / "optimizer" / "predict" / "data"
C_GRID = [0.5 + 0.01 * i for i in range(251)]
CLIFF = "Llama-3.1-70B-Instruct"


def load_curves() -> dict[tuple[str, str], list[tuple[float, float]]]:
    out: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    with (DATA / "published-ppl.csv").open() as f:
        for r in csv.DictReader(f):
            if r["head_bits"] == "3":  # the H3 points test the head, not the curve (prediction.md §2.2)
                continue
            out[(r["model"], r["format"])].append((float(r["bpw"]), float(r["ppl"])))
    return {k: sorted(v) for k, v in out.items()}


def _sse(c: float, pts: list[tuple[float, float]]) -> float:
    a, r = _solve(c, pts)
    return sum((math.log(p) - r - a * math.exp(-c * b)) ** 2 for b, p in pts)


def pooled_slope(curves: list[list[tuple[float, float]]]) -> float:
    return min(C_GRID, key=lambda c: sum(_sse(c, [p for p in pts if p[0] >= 2.4]) for pts in curves))


def fit_formats(curves: dict[tuple[str, str], list[tuple[float, float]]], models: set[str],
                refs: dict[str, float]) -> dict[str, Curve]:
    """Per format, on ``models`` only: with each model's reference ``refs[m]`` fixed, the slope c shared by the
    curves and ``beta`` = mean over the curves of ln(A)/c (model offsets sum to 0) -- the factorised fit of
    prediction.md §2.3; the anchored slope is pooled without the cliff-prone 70B curve."""
    out = {}
    for fmt in CURVES:
        own = [(m, [p for p in pts if p[0] >= 2.4]) for (m, f), pts in curves.items() if f == fmt and m in models]
        best: tuple[float, float, list[float]] | None = None
        for c in C_GRID:
            sse, log_a = 0.0, []
            for m, pts in own:
                xs = [math.exp(-c * b) for b, _ in pts]
                ys = [math.log(p) - refs[m] for _, p in pts]
                a = max(sum(x * y for x, y in zip(xs, ys, strict=True)) / sum(x * x for x in xs), 1e-12)
                sse += sum((y - a * x) ** 2 for x, y in zip(xs, ys, strict=True))
                log_a.append(math.log(a))
            if best is None or sse < best[0]:
                best = (sse, c, log_a)
        assert best is not None
        _, c, log_a = best
        calm = [pts for (m, f), pts in curves.items() if f == fmt and m in models and m != CLIFF]
        out[fmt] = Curve(c=c, beta=statistics.mean(log_a) / c, c_anchored=pooled_slope(calm or [p for _, p in own]))
    return out


def model_reference(curves: dict[tuple[str, str], list[tuple[float, float]]], model: str, shipped: dict[str, Curve]) -> float:
    """The model's ln(ppl_ref): one reference shared by its curves (least squares over a grid of references)."""
    own = {f: [p for p in pts if p[0] >= 2.4] for (m, f), pts in curves.items() if m == model}
    lo = min(math.log(p) for pts in own.values() for _, p in pts)
    best = None
    for i in range(400):
        r = lo - 0.2 + 0.2 * i / 400
        err = 0.0
        for f, pts in own.items():
            c = shipped[f].c
            xs = [math.exp(-c * b) for b, _ in pts]
            ys = [math.log(p) - r for _, p in pts]
            a = max(sum(x * y for x, y in zip(xs, ys, strict=True)) / sum(x * x for x in xs), 0.0)
            err += sum((y - a * x) ** 2 for x, y in zip(xs, ys, strict=True))
        if best is None or err < best[0]:
            best = (err, r)
    assert best is not None
    return best[1]


def spearman(xs: list[float], ys: list[float]) -> float:
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        for pos, i in enumerate(order):
            r[i] = float(pos)
        return r
    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(int(q * len(s)), len(s) - 1)]


def perplexity_report() -> dict[str, float]:
    curves = load_curves()
    models = {m for m, _ in curves}
    refs = {m: model_reference(curves, m, CURVES) for m in models}
    e0: list[float] = []
    e0_3: list[float] = []
    e2: list[float] = []
    naive: list[float] = []
    naive_rd: list[float] = []
    rhos: list[float] = []
    for held in sorted(models):
        consts = fit_formats(curves, models - {held}, refs)
        log_ref = refs[held]
        preds, meas = [], []
        for (m, fmt), pts in curves.items():
            if m != held:
                continue
            prior = fit(fmt, (), curve=consts[fmt])
            for b, p in pts:
                ratio = prior.predict(b).value
                preds.append(ratio)
                meas.append(p)
                if b >= 2.4:
                    e0.append(abs(math.exp(log_ref) * ratio / p - 1))
                if b >= 3.0:
                    e0_3.append(e0[-1])
            hi = max(pts)
            lo = min(pts, key=lambda q: abs(q[0] - 3.0))
            anchored = fit(fmt, [lo, hi], curve=consts[fmt])
            rate_distortion = fit(fmt, [lo, hi], curve=Curve(c=math.log(4), beta=0.0, c_anchored=math.log(4)))
            for b, p in pts:
                if lo[0] < b < hi[0]:
                    e2.append(abs(anchored.predict(b).value / p - 1))
                    t = (b - lo[0]) / (hi[0] - lo[0])
                    naive.append(abs(math.exp((1 - t) * math.log(lo[1]) + t * math.log(hi[1])) / p - 1))
                    naive_rd.append(abs(rate_distortion.predict(b).value / p - 1))
        rhos.append(spearman(preds, meas))
    print("Perplexity, leave one model out (4 models x EXL2/EXL3/GGUF, exllamav3 doc/exl3.md charts)")
    print(f"  0 anchors (ratio to FP16 ref), b>=2.4: n={len(e0):3d} median |error| {100 * statistics.median(e0):.2f} %"
          f"  p90 {100 * pct(e0, 0.9):.1f} %")
    print(f"  2 anchors, between them:           n={len(e2):3d} median |error| {100 * statistics.median(e2):.2f} %"
          f"  p90 {100 * pct(e2, 0.9):.1f} %  max {100 * max(e2):.1f} %")
    print(f"  0 anchors, b>=3.0 only:            n={len(e0_3):3d} median |error| {100 * statistics.median(e0_3):.2f} %")
    print(f"  naive, same anchors: exp curve at the rate-distortion slope ln 4: median |error| "
          f"{100 * statistics.median(naive_rd):.2f} %  p90 {100 * pct(naive_rd, 0.9):.1f} %")
    print(f"  naive, same anchors: ln ppl linear in bits:                median |error| "
          f"{100 * statistics.median(naive):.2f} %  p90 {100 * pct(naive, 0.9):.1f} %")
    allc = fit_formats(curves, models, refs)
    print("  format constants refitted on all 4 models vs shipped (c, beta, c_anchored): "
          + "; ".join(f"{f} {allc[f].c:.2f}/{allc[f].beta:.2f}/{allc[f].c_anchored:.2f} vs "
                      f"{CURVES[f].c:.2f}/{CURVES[f].beta:.2f}/{CURVES[f].c_anchored:.2f}" for f in CURVES))
    print(f"  rank correlation (Spearman, 0 anchors, all formats of a model): mean {statistics.mean(rhos):.3f}"
          f"  min {min(rhos):.3f}")
    return {"ppl0": statistics.median(e0), "ppl0_3": statistics.median(e0_3), "ppl2": statistics.median(e2),
            "naive": statistics.median(naive_rd),
            "rho": statistics.mean(rhos)}


def main() -> None:
    q = perplexity_report()
    s = speed_report()
    print(f"\nsummary: ppl_0_anchors={100 * q['ppl0']:.2f}% (b>=3: {100 * q['ppl0_3']:.2f}%) ppl_2_anchors={100 * q['ppl2']:.2f}% "
          f"naive_2_anchors={100 * q['naive']:.2f}% rank_rho={q['rho']:.3f} decode_speed_priors={100 * s['all']:.1f}% "
          f"(excl. host-bound {100 * s['excl_host_bound']:.1f}%, groups within 10%: {s['groups_within']:.0f}/{s['groups']:.0f})")


if __name__ == "__main__":
    main()
