"""Simulated GPU-seconds of a search, against the cheapest possible one and the usual alternatives.

Usage: ``.venv/bin/python benchmarks/search_cost.py [--tpe-seeds 3]``

Landscapes (``benchmarks/cost_model.py``): synthesized exl2 variants (header-only, from config.json alone) of real
model shapes at several bpw, every cache mode, a context grid and a VRAM budget that rejects part of the space;
perplexity and speed from a smooth made-up landscape, the costs of a GPU held (load, cache build, perplexity per
window, speed test, failed load) documented there. The fourth landscape is 8 variants x 5 caches on 2 GPUs with a
manual split; the fifth has one variant 5 % worse than any smooth curve (the prediction misleads).

Strategies (seconds of GPU time; "front" = every configuration of the true Pareto front of perplexity, generation
tok/s and context):

    exl2opt       the real ``optimizer.study.run`` with its default guided search (``exhaustive=False``, speed
                  predicted for an RTX 4090), driven by the cost-counting engine; its *total* time (it cannot know
                  when it has the front, so it is charged until it stops), and the fraction of the front it measured
    --exhaustive  the same loop measuring every feasible configuration (today's behaviour): time to the front, total
    front oracle  exactly the front's configurations, each variant loaded once (also under autosplit: a cache fits
                  in the placement made around a larger one), each perplexity (20 windows) and speed measured once
    hand loop     a careful person without the VRAM model: per variant (best first) load once, FP16 cache first,
                  per cache try contexts upward until the first OOM (a quantized cache only above the context FP16
                  reached: it is slower and no better, worth it only for context), perplexity once per (variant,
                  cache), speed per fill;
                  under autosplit a fresh load per cache and context (what ExLlamaV2's loader does: without the
                  VRAM model nobody knows which placement holds which cache)
    TPE+VRAM      Optuna TPE (multivariate) over (variant, cache, ctx), told the VRAM model (infeasible asks and
                  repeats cost nothing); one load and full measurement per new configuration; until the front is found
                  (capped at 4x the space, then marked '>')
    grid          every configuration in grid order, one load each, no VRAM model (an infeasible one = failed load)

Each landscape ends with one line ``<name>: ratio_to_front_oracle=<x> front_recall=<y>`` (exl2opt total / oracle).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cost_model import (  # noqa: E402
    CostBackend,
    CostEngine,
    Landscape,
    build,
    cache_cost,
    fill_of,
    gen_of,
    landscapes,
    load_s,
    ppl_cost,
    ppl_of,
    speed_cost,
)

from optimizer.evaldata import EvalText  # noqa: E402
from optimizer.schedule import Point, pareto  # noqa: E402
from optimizer.study import SearchSpec, build_space, run  # noqa: E402

GPU = ("RTX 4090",)
LOSSLESS = "fp16"  #: exllamav2's lossless cache mode (its other modes are decoded to it every step)


def _run(ls: Landscape, spec: SearchSpec, cache_b: dict[str, int], root: Path, *, exhaustive: bool) -> tuple[CostEngine, Any]:
    eng = CostEngine(ls=ls, cache_bytes=cache_b)
    res = run(spec=spec, study_name="bench", backend_factory=lambda v, e=eng: CostBackend(e),
              eval_text=lambda: EvalText(dataset_id="sim", text="x"), root=root, sampler="auto", seed=0,
              exhaustive=exhaustive, gpus=GPU)
    return eng, res


def oracle_cost(front: list[Any], cache_b: dict[str, int]) -> float:
    t = 0.0
    loaded: set[str] = set()
    ppl_done: set[tuple[str, str]] = set()
    speed_done: set[tuple[str, str, int]] = set()
    for c in front:
        v, cfg = c.config.variant, c.config
        if v.key not in loaded:
            t += load_s(v)
            loaded.add(v.key)
        t += cache_cost(cache_b[c.key])
        if (v.key, cfg.cache) not in ppl_done:
            t += ppl_cost(v)
            ppl_done.add((v.key, cfg.cache))
        f = fill_of(cfg.max_seq_len)
        if (v.key, cfg.cache, f) not in speed_done:
            t += speed_cost(v, cfg.cache, f, cfg.split)
            speed_done.add((v.key, cfg.cache, f))
    return t


def hand_loop(cands: list[Any], front: set[str], cache_b: dict[str, int], auto: bool) -> float:
    """Time until the front is measured by the careful hand loop (see module docstring)."""
    t, seen = 0.0, set()
    by_var: dict[str, list[Any]] = {}
    for c in cands:
        by_var.setdefault(c.config.variant.key, []).append(c)
    for vk in sorted(by_var, key=lambda k: -(by_var[k][0].config.variant.bits or 0)):
        group = by_var[vk]
        v = group[0].config.variant
        if not any(c.verdict.fits for c in group):
            t += load_s(v)  # the load itself (or the first cache) fails: found out after loading
            continue
        if not auto:
            t += load_s(v)
        lossless_ctx = 0  # a careful user tries a quantized cache only for more context than FP16 holds
        for cache in sorted(dict.fromkeys(c.config.cache for c in group), key=lambda m: m != LOSSLESS):
            ppl_known, fills = False, set()
            for c in sorted((c for c in group if c.config.cache == cache), key=lambda c: c.config.max_seq_len):
                if cache != LOSSLESS and c.config.max_seq_len <= lossless_ctx:
                    continue
                if auto:
                    t += load_s(v)
                t += cache_cost(cache_b[c.key])
                if not c.verdict.fits:
                    break  # first OOM: larger contexts are not tried
                if cache == LOSSLESS:
                    lossless_ctx = c.config.max_seq_len
                if not ppl_known:
                    t += ppl_cost(v)
                    ppl_known = True
                f = fill_of(c.config.max_seq_len)
                if f not in fills:
                    t += speed_cost(v, cache, f, c.config.split)
                    fills.add(f)
                seen.add(c.key)
                if front <= seen:
                    return t
    return t


def tpe_time(ls: Landscape, cands: list[Any], front: set[str], full: dict[str, float], *, seed: int,
             cap_trials: int) -> tuple[float, bool]:
    import optuna

    by_params = {(c.config.variant.key, c.config.cache, c.config.max_seq_len): c for c in cands}
    space = [sorted({k[i] for k in by_params}) for i in range(3)]
    study = optuna.create_study(directions=["minimize", "maximize", "maximize"],
                                sampler=optuna.samplers.TPESampler(multivariate=True, seed=seed))
    clock, seen = 0.0, set()
    for _ in range(cap_trials):
        t = study.ask()
        c = by_params[(t.suggest_categorical("variant", space[0]), t.suggest_categorical("cache", space[1]),
                       t.suggest_categorical("ctx", space[2]))]
        if not c.verdict.fits:  # the VRAM model answers: no GPU time
            study.tell(t, state=optuna.trial.TrialState.FAIL)
            continue
        v, cfg = c.config.variant, c.config
        if c.key not in seen:
            clock += full[c.key]
            seen.add(c.key)
        study.tell(t, [ppl_of(ls, v, cfg.cache), gen_of(v, cfg.cache, fill_of(cfg.max_seq_len), cfg.split),
                       float(cfg.max_seq_len)])
        if front <= seen:
            return clock, False
    return clock, True


def one(ls: Landscape, tmp: Path, tpe_seeds: int) -> dict[str, Any]:
    spec = build(ls, tmp)
    cands = build_space(spec)
    feas = [c for c in cands if c.verdict.fits]
    pts = {c.key: Point(ppl_of(ls, c.config.variant, c.config.cache),
                        gen_of(c.config.variant, c.config.cache, fill_of(c.config.max_seq_len), c.config.split),
                        c.config.max_seq_len) for c in feas}
    front = pareto(pts)
    cache_b = {c.key: sum(d.cache + d.cache_staging for d in c.verdict.devices) for c in cands}
    full = {c.key: load_s(c.config.variant) + cache_cost(cache_b[c.key]) + ppl_cost(c.config.variant)
            + speed_cost(c.config.variant, c.config.cache, fill_of(c.config.max_seq_len), c.config.split) for c in cands}
    auto = ls.split.mode == "auto"
    root = tmp / "studies" / ls.name.replace(" ", "_").replace(",", "").replace("%", "pct")
    guided, gres = _run(ls, spec, cache_b, root / "guided", exhaustive=False)
    measured = {k for _, k in guided.done}
    exh, _ = _run(ls, spec, cache_b, root / "exhaustive", exhaustive=True)
    exh_found = max(t for t, k in exh.done if k in front)
    clock, seen, t_grid = 0.0, set(), 0.0
    for c in cands:  # build_space order = grid order (variant-major)
        clock += full[c.key] if c.verdict.fits else load_s(c.config.variant)
        seen.add(c.key)
        if front <= seen:
            t_grid = clock
            break
    tpe = [tpe_time(ls, cands, front, full, seed=s, cap_trials=4 * len(cands)) for s in range(tpe_seeds)]
    return {"ls": ls, "n": len(cands), "fit": len(feas), "front": len(front), "guided": guided.clock,
            "measured": len(measured), "skipped": gres.n_skipped, "recall": len(front & measured) / len(front),
            "exh_found": exh_found, "exh_total": exh.clock, "oracle": oracle_cost([c for c in feas if c.key in front],
                                                                                   cache_b),
            "hand": hand_loop(cands, front, cache_b, auto), "tpe": tpe, "grid": t_grid}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tpe-seeds", type=int, default=3)
    args = ap.parse_args()
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    with tempfile.TemporaryDirectory() as tmpd:
        rows = [one(ls, Path(tmpd), args.tpe_seeds) for ls in landscapes()]
    print("Simulated GPU-seconds (lower is better); exl2opt = total of the default guided search\n")
    print(f"{'landscape':<34}{'cfgs':>5}{'fit':>5}{'front':>6}{'meas':>5}{'exl2opt':>9}{'oracle':>8}{'exhaust':>9}"
          f"{'(total)':>8}{'hand':>8}{'TPE+VRAM':>10}{'grid':>8}")
    for r in rows:
        med = statistics.median(t for t, _ in r["tpe"])
        capped = ">" if any(c for _, c in r["tpe"]) else ""
        print(f"{r['ls'].name:<34}{r['n']:>5}{r['fit']:>5}{r['front']:>6}{r['measured']:>5}{r['guided']:>9.0f}"
              f"{r['oracle']:>8.0f}{r['exh_found']:>9.0f}{r['exh_total']:>8.0f}{r['hand']:>8.0f}"
              f"{capped + format(med, '.0f'):>10}{r['grid']:>8.0f}")
    print("\nRatios to exl2opt (how many times more GPU time the alternative needs):")
    for r in rows:
        med = statistics.median(t for t, _ in r["tpe"])
        print(f"  {r['ls'].name:<34} exhaustive {r['exh_found'] / r['guided']:4.2f}x  hand {r['hand'] / r['guided']:4.2f}x"
              f"  TPE+VRAM {med / r['guided']:4.2f}x  grid {r['grid'] / r['guided']:5.2f}x  (skipped {r['skipped']})")
    print()
    for r in rows:
        print(f"{r['ls'].name}: ratio_to_front_oracle={r['guided'] / r['oracle']:.2f} front_recall={r['recall']:.2f}")


if __name__ == "__main__":
    main()
