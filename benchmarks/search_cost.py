"""Simulated GPU-seconds until the full Pareto front is found: exl2opt vs an exhaustive grid vs plain TPE.

Usage: ``.venv/bin/python benchmarks/search_cost.py [--tpe-seeds 3]``

Landscapes: synthesized exl2 variants (header-only, from config.json alone) of real model shapes at
several bpw, every cache mode, a context grid, and a VRAM budget that rejects part of the space.
Perplexity and speed come from a smooth made-up landscape (lower bpw: worse perplexity, faster;
lossy caches: a little worse; fuller cache: slower). Costs (seconds of a GPU held):

    model load        4 s + weight bytes / 1.5 GB/s              (disk -> GPU)
    cache (re)build   0.5 s + cache bytes / 20 GB/s
    perplexity        20 windows x 2048 tokens / prompt tok/s + 2 s
    speed test        fill / prompt tok/s + 128 / gen tok/s + 1 s warm-up
    failed load (OOM) the load time (the engine finds out at the end of loading)
    prompt tok/s      4e13 / weight bytes;   gen tok/s  1e12 / weight bytes x cache factor / (1 + fill/64Ki)

Strategies:
    exl2opt      the real ``optimizer.study.run`` (sampler auto) driven by a cost-counting engine:
                 infeasible configurations never loaded, perplexity per (variant, cache), speed per
                 (variant, cache, split, fill), model kept across trials of a variant.
    grid         every configuration in grid order, one model load per configuration, no VRAM model
                 (infeasible ones cost a failed load), every measurement redone.
    tpe          plain Optuna TPE (multivariate) over (variant, cache, ctx), one load + full
                 measurement per trial, infeasible = failed load; duplicates re-measured. Stops when
                 the front is found or after 4x the grid size (then counted as that cost, marked '>').
    lower bound  each variant with a feasible configuration loaded once, each needed perplexity and
                 speed measured once, one cache build per feasible configuration.

"Front found" = every configuration of the true Pareto front (perplexity, gen tok/s, context) has
been measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from optimizer.backends.base import (  # noqa: E402
    DeviceMemory,
    EvalProtocol,
    LoadSpec,
    PrepareInfo,
    SpeedProtocol,
    SpeedResult,
)
from optimizer.evaldata import EvalText  # noqa: E402
from optimizer.formats.exl2_synth import synthesize  # noqa: E402
from optimizer.safetensors_header import write_header_only  # noqa: E402
from optimizer.sources.local import discover_local  # noqa: E402
from optimizer.space import Budget  # noqa: E402
from optimizer.study import SearchSpec, build_space, run  # noqa: E402
from optimizer.units import parse_size  # noqa: E402
from optimizer.variant import Variant  # noqa: E402
from optimizer.vram import Split  # noqa: E402

CACHE_PPL = {"fp16": 0.0, "fp8": 0.06, "q8": 0.004, "q6": 0.012, "q4": 0.05}
CACHE_GEN = {"fp16": 1.0, "fp8": 0.97, "q8": 0.92, "q6": 0.94, "q4": 0.96}
SPEED = SpeedProtocol(context_fill=2048, gen_tokens=128)
EVAL = EvalProtocol()


def load_s(v: Variant) -> float:
    return 4.0 + v.total_bytes / 1.5e9


def prompt_tps(v: Variant) -> float:
    return 4e13 / v.total_bytes


def ppl_of(v: Variant, cache: str) -> float:
    return 5.0 + 6.0 / (v.bits or 4.0) ** 1.5 + CACHE_PPL[cache]


def gen_of(v: Variant, cache: str, fill: int, split: Split) -> float:
    return 1e12 / v.total_bytes * CACHE_GEN[cache] / (1 + fill / 65536) / (1.0 + 0.08 * (split.n_devices - 1))


def ppl_cost(v: Variant) -> float:
    return EVAL.n_windows * EVAL.window / prompt_tps(v) + 2.0


def speed_cost(v: Variant, cache: str, fill: int, split: Split) -> float:
    return fill / prompt_tps(v) + SPEED.gen_tokens / gen_of(v, cache, fill, split) + 1.0


def cache_cost(pred_cache_bytes: int) -> float:
    return 0.5 + pred_cache_bytes / 20e9


@dataclass
class CostEngine:
    """Engine that only advances a simulated clock."""

    clock: float = 0.0
    spec: LoadSpec | None = None
    model_key: tuple[str, str] | None = None
    done: list[tuple[float, str]] = field(default_factory=list)
    cache_bytes: dict[str, int] = field(default_factory=dict)

    def prepare(self, spec: LoadSpec) -> PrepareInfo:
        loaded = spec.model_key != self.model_key or spec.split.mode == "auto"
        if loaded:
            self.clock += load_s(spec.variant)
        self.clock += cache_cost(self.cache_bytes.get(_key(spec), 0))
        self.model_key, self.spec = spec.model_key, spec
        return PrepareInfo(model_loaded=loaded)

    def tokenize(self, text: str) -> list[int]:
        return [0] * 10

    def perplexity(self, *, tokens: Any, protocol: EvalProtocol) -> float:
        assert self.spec
        self.clock += ppl_cost(self.spec.variant)
        return ppl_of(self.spec.variant, self.spec.cache)

    def speed(self, *, protocol: SpeedProtocol) -> SpeedResult:
        s = self.spec
        assert s
        self.clock += speed_cost(s.variant, s.cache, protocol.context_fill, s.split)
        g = gen_of(s.variant, s.cache, protocol.context_fill, s.split)
        return SpeedResult(prompt_tok_s=prompt_tps(s.variant), gen_tok_s=g, context_fill=protocol.context_fill)

    def memory(self) -> tuple[DeviceMemory, ...]:
        assert self.spec
        self.done.append((self.clock, _key(self.spec)))
        return ()

    def unload(self) -> None:
        self.model_key = None

    def close(self) -> None:
        pass


def _key(s: LoadSpec) -> str:
    return f"{s.variant.key}|ctx={s.max_seq_len}|cache={s.cache}|split={s.split.label}"


@dataclass
class CostBackend:
    engine: CostEngine
    name: str = "cost"
    formats: tuple[str, ...] = ("exl2",)

    def check_available(self) -> None:
        return None

    def open(self) -> CostEngine:
        return self.engine


@dataclass(frozen=True)
class Landscape:
    name: str
    config: dict[str, Any]
    bits: tuple[float, ...]
    vram: str
    split: Split
    contexts: tuple[int, ...]


def landscapes() -> list[Landscape]:
    smaug = json.loads((ROOT / "studies/examples/Smaug-34B-v0.1-3.0bpw-h6-exl2/config.json").read_text())
    smaug.pop("quantization_config", None)
    llama8 = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
              "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 128256,
              "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0}
    ctx = (4096, 8192, 16384, 32768, 65536)
    return [
        Landscape("Smaug-34B, 24GB, 1 GPU", smaug, (2.5, 3.0, 3.5, 4.0, 4.65, 5.0, 6.0), "24GB", Split(), ctx),
        Landscape("Llama-3-8B shape, 10GB, 1 GPU", llama8, (3.0, 4.0, 5.0, 6.0, 8.0), "10GB", Split(), ctx),
        Landscape("Smaug-34B, 2x16GB autosplit", smaug, (3.0, 4.0, 5.0, 6.0), "16GB", Split(mode="auto", n_devices=2), ctx),
    ]


def build(ls: Landscape, tmp: Path) -> SearchSpec:
    for b in ls.bits:
        d = tmp / ls.name.replace(" ", "_").replace(",", "") / f"{b}bpw"
        d.mkdir(parents=True, exist_ok=True)
        cfg = dict(ls.config, quantization_config={"quant_method": "exl2", "bits": b, "head_bits": 6})
        (d / "config.json").write_text(json.dumps(cfg))
        write_header_only(d / "output.safetensors", synthesize(cfg, bits=b, head_bits=6))
    variants = discover_local(tmp / ls.name.replace(" ", "_").replace(",", ""))
    return SearchSpec(variants=tuple(variants), budget=Budget(per_device=(parse_size(ls.vram),)), split=ls.split,
                      contexts=ls.contexts, eval_protocol=EVAL, speed_protocol=SPEED)


def true_front(points: dict[str, tuple[float, float, float]]) -> set[str]:
    return {k for k, p in points.items()
            if not any(q[0] <= p[0] and q[1] >= p[1] and q[2] >= p[2] and q != p for q in points.values())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tpe-seeds", type=int, default=3)
    args = ap.parse_args()
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    rows = []
    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        for ls in landscapes():
            spec = build(ls, tmp)
            cands = build_space(spec)
            feas = [c for c in cands if c.verdict.fits]
            fill = {c.key: max(min(SPEED.context_fill, c.config.max_seq_len - SPEED.gen_tokens), 1) for c in cands}
            pts = {c.key: (ppl_of(c.config.variant, c.config.cache),
                           gen_of(c.config.variant, c.config.cache, fill[c.key], c.config.split), float(c.config.max_seq_len))
                   for c in feas}
            front = true_front(pts)
            cache_b = {c.key: sum(d.cache + d.cache_staging for d in c.verdict.devices) for c in cands}
            full = {c.key: load_s(c.config.variant) + cache_cost(cache_b[c.key]) + ppl_cost(c.config.variant)
                    + speed_cost(c.config.variant, c.config.cache, fill[c.key], c.config.split) for c in cands}
            fail = {c.key: load_s(c.config.variant) for c in cands}

            # exl2opt
            eng = CostEngine(cache_bytes=cache_b)
            res = run(spec=spec, study_name="bench", backend_factory=lambda v, e=eng: CostBackend(e),
                      eval_text=lambda: EvalText(dataset_id="sim", text="x"), root=tmp / "studies" / ls.name.replace(" ", "_"),
                      sampler="auto", seed=0)
            t_found = max(t for t, k in eng.done if k in front)
            # grid: one load per configuration, grid order (enumerate_configs order)
            clock, seen, t_grid = 0.0, set(), None
            for c in cands_grid_order(spec):
                clock += full[c.key] if c.verdict.fits else fail[c.key]
                seen.add(c.key)
                if t_grid is None and front <= seen:
                    t_grid = clock
            # TPE
            t_tpe = []
            for seed in range(args.tpe_seeds):
                t_tpe.append(tpe_time(cands, front, full, fail, seed=seed, cap_trials=4 * len(cands)))
            # lower bound
            lb = sum(load_s(v) for v in {c.config.variant for c in feas})
            lb += sum(ppl_cost(v) for v in {c.config.variant for c in feas} for _ in
                      {c.config.cache for c in feas if c.config.variant == v})
            lb += sum(speed_cost(c.config.variant, c.config.cache, f, c.config.split) for (c, f) in
                      {(c.config.variant.key, c.config.cache, fill[c.key]): (c, fill[c.key]) for c in feas}.values())
            lb += sum(cache_cost(cache_b[c.key]) for c in feas)
            if ls.split.mode == "auto":  # autosplit must reload per cache size: bound is one load per config
                lb += sum(load_s(c.config.variant) for c in feas) - sum(load_s(v) for v in {c.config.variant for c in feas})
            rows.append({"ls": ls, "n": len(cands), "fit": len(feas), "front": len(front), "loads": res.model_loads,
                         "found": t_found, "total": eng.clock, "grid": t_grid, "tpe": t_tpe, "bound": lb,
                         "wall": res.seconds, "exhausted": res.exhausted})

    print("Simulated GPU-seconds until the full Pareto front is measured (lower is better)\n")
    print(f"{'landscape':<32}{'cfgs':>5}{'fit':>5}{'front':>6}{'loads':>6}{'exl2opt':>9}{'(end)':>8}"
          f"{'grid':>9}{'tpe med':>9}{'bound':>8}")
    for r in rows:
        med = statistics.median(t for t, _ in r["tpe"])
        capped = ">" if any(c for _, c in r["tpe"]) else ""
        print(f"{r['ls'].name:<32}{r['n']:>5}{r['fit']:>5}{r['front']:>6}{r['loads']:>6}{r['found']:>9.0f}"
              f"{r['total']:>8.0f}{r['grid']:>9.0f}{capped + format(med, '.0f'):>9}{r['bound']:>8.0f}")
    print("\nRatios (time to the full front):")
    for r in rows:
        med = statistics.median(t for t, _ in r["tpe"])
        print(f"  {r['ls'].name:<32} grid/exl2opt {r['grid'] / r['found']:5.1f}x   tpe/exl2opt {med / r['found']:5.1f}x"
              f"   exl2opt/bound {r['found'] / r['bound']:4.2f}   (study loop: {r['wall']:.1f} s real CPU time,"
              f" exhausted={r['exhausted']})")


def cands_grid_order(spec: SearchSpec) -> list[Any]:
    from optimizer.space import enumerate_configs, evaluate

    out = []
    for c in enumerate_configs(variants=spec.variants, contexts=spec.contexts, caches=spec.caches, split=spec.split):
        out.append(_C(c.key, evaluate(config=c, budget=spec.budget)))
    return out


@dataclass(frozen=True)
class _C:
    key: str
    verdict: Any


def tpe_time(cands: list[Any], front: set[str], full: dict[str, float], fail: dict[str, float], *, seed: int,
             cap_trials: int) -> tuple[float, bool]:
    import optuna

    by_params = {(c.config.variant.key, c.config.cache, c.config.max_seq_len): c for c in cands}
    variants = sorted({k[0] for k in by_params})
    caches = sorted({k[1] for k in by_params})
    ctxs = sorted({k[2] for k in by_params})
    study = optuna.create_study(directions=["minimize", "maximize", "maximize"],
                                sampler=optuna.samplers.TPESampler(multivariate=True, seed=seed))
    clock, seen = 0.0, set()
    for _ in range(cap_trials):
        t = study.ask()
        key = (t.suggest_categorical("variant", variants), t.suggest_categorical("cache", caches),
               t.suggest_categorical("ctx", ctxs))
        c = by_params[key]
        if not c.verdict.fits:
            clock += fail[c.key]
            study.tell(t, state=optuna.trial.TrialState.FAIL)
            continue
        clock += full[c.key]
        seen.add(c.key)
        v = c.config.variant
        fill = max(min(SPEED.context_fill, c.config.max_seq_len - SPEED.gen_tokens), 1)
        study.tell(t, [ppl_of(v, c.config.cache), gen_of(v, c.config.cache, fill, c.config.split), float(c.config.max_seq_len)])
        if front <= seen:
            return clock, False
    return clock, True


if __name__ == "__main__":
    main()
